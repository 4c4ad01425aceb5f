"""LodeRadialIntegral against quadrature, mpmath, featomic's own reference values, and
featomic-torch's LodeSphericalExpansion end to end (through tests/_lode_reference.py)."""

import math
import warnings

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch

from _lode_reference import k_vectors, lode_expansion, real_spherical_harmonics
from rascaline_e3nn import _featomic_math as fm
from rascaline_e3nn._lode_radial import (
    LodeRadialIntegral,
    _gto_integral,
    _spline_evaluate,
    gto_gaussian_widths,
    k0_factor,
    parse_hypers,
)


def density(exponent, smearing=1.0, center_atom_weight=1.0):
    return {
        "type": "SmearedPowerLaw",
        "smearing": smearing,
        "exponent": exponent,
        "center_atom_weight": center_atom_weight,
    }


def basis(max_angular, max_radial, radius=3.0, spline_accuracy=1e-8):
    return {
        "type": "TensorProduct",
        "max_angular": max_angular,
        "radial": {"type": "Gto", "max_radial": max_radial, "radius": radius},
        "spline_accuracy": spline_accuracy,
    }


def radial_integral(exponent=1, max_angular=3, max_radial=3, spline_accuracy=1e-8, **kwargs):
    return LodeRadialIntegral(
        **parse_hypers(
            density(exponent, **kwargs),
            basis(max_angular, max_radial, spline_accuracy=spline_accuracy),
        )
    )


# ------------------------------------------------------------ featomic's functions


#: featomic's hyp1f1.rs reference values (from Mathematica), z and ((n, l), values)
HYP1F1_Z = [0.0, 1.3, 42.0, 200.0, 660.0, -1.0, -40.0, -200.0, -500.0, 3e-1, 2e-4, -4e-1, -8e-4]
HYP1F1_REFERENCE = [
    ((0, 0), [1.0, 3.66929666761924, 1.7392749415205e+18, 7.22597376812575e+86, 4.30881706558659e+286, 0.367879441171442, 4.24835425529159e-18, 1.38389652673674e-87, 7.12457640674129e-218, 1.349858807576, 1.00020002000133, 0.670320046035639, 0.999200319914684]),  # noqa: E501
    ((5, 6), [1.0, 3.38401720456627, 6.51794558745076e+17, 1.3083980191885e+86, 4.33929373469791e+285, 0.394775712369039, 7.11266970817605e-9, 8.39682564330044e-14, 1.36092469650155e-16, 1.32355791582708, 1.0001866842364, 0.688849034868493, 0.999253614360372]),  # noqa: E501
    ((13, 12), [1.0, 3.8421649506219, 3.54519102852153e+18, 2.89704505824636e+87, 3.07058123688245e+287, 0.354011483088197, -3.5964781936063e-14, -3.28638636385084e-24, -8.25083453006346e-30, 1.36478040300447, 1.00020742886482, 0.660319994010777, 0.999170713570911]),  # noqa: E501
    ((12, 15), [1.0, 3.27284968979622, 2.44964775706581e+17, 1.37335603673345e+85, 1.46589177252824e+284, 0.403871683240152, 4.2979422347514e-12, 1.71877602004918e-22, 1.88996873825758e-28, 1.31381868447175, 1.00018183480621, 0.695409738903967, 0.99927299318159]),  # noqa: E501
]


@pytest.mark.parametrize("case", HYP1F1_REFERENCE, ids=lambda c: f"n{c[0][0]}-l{c[0][1]}")
def test_hyp1f1_reference_values(case):
    (n, l), expected = case
    a = 0.5 * (n + l + 3)
    b = l + 1.5
    values = fm.hyp1f1(a, b, np.array(HYP1F1_Z))
    # featomic's assert_relative_eq!(max_relative=1e-13) also accepts absolute
    # differences below f64::EPSILON: its 30-term asymptotic series is only accurate to
    # ~1e-10 relative for the tiny values at z = -40
    np.testing.assert_allclose(values, expected, rtol=1e-13, atol=fm.EPSILON)


def test_hyp1f1_torch_equals_numpy():
    from rascaline_e3nn._lode_radial import _hyp1f1, hyp1f1_constants

    z = -np.concatenate([[0.0], np.geomspace(1e-4, 2000.0, 150)])
    for n in range(0, 14, 2):
        for l in (0, 1, 2, 5, 8):
            a, b = 0.5 * (n + l + 3), l + 1.5
            expected = fm.hyp1f1(a, b, z)
            actual = _hyp1f1(a, b, torch.tensor(z), hyp1f1_constants(a, b)).numpy()
            # featomic's algorithm itself loses accuracy beyond |z| ~ 300, where its
            # 500-term power series cancels catastrophically (b - a < 0)
            moderate = np.abs(z) < 300
            checked = moderate & (np.arange(z.shape[0]) % 7 == 0)
            # torch's exp and pow may differ from the C library's by one ulp
            np.testing.assert_allclose(
                actual[moderate], expected[moderate], rtol=1e-14, atol=1e-300
            )
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)
            np.testing.assert_allclose(
                expected[checked],
                [float(mpmath.hyp1f1(a, b, v)) for v in z[checked]],
                rtol=1e-9,
                atol=1e-15,
            )


def test_hyp2f1_gamma_exp1():
    # featomic's hyp2f1.rs points computed with scipy
    for a, b, c, x, expected in [
        (0.1, 1.0, 2.0, -5.0, 0.892389513881694),
        (1.0, 0.5, -4.5, -20.0, 0.446746825239319),
        (2.0, -2.0, -3.0, 0.5, 1.91666666666667),
        (1.0, -0.5, -4.5, -5.0, 0.469756352472402),
        (-7.2, -0.5, -4.5, -1.0, 19.9158826472958),
        (-1.0, 1.0, -2.0, 0.9, 1.45),
    ]:
        assert fm.hyp2f1(a, b, c, x) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the arguments of the centre-atom contribution, against mpmath
    for n in range(12):
        for p in range(1, 10):
            for hyparg in (0.02, 0.3, 0.8, 0.97):
                a, b, c = 1.0, 0.5 * (3 + n), (p + 2.0) / 2.0
                expected = float(mpmath.hyp2f1(a, b, c, hyparg))
                assert fm.hyp2f1(a, b, c, hyparg) == pytest.approx(expected, rel=1e-7)
    for x in (0.5, 1.5, 2.5, 3.0, 4.5, 7.5, 10.0):
        assert fm.gamma(x) == pytest.approx(math.gamma(x), rel=1e-14)
        assert fm.ln_gamma(x) == pytest.approx(math.lgamma(x), rel=1e-13, abs=1e-15)
    for x in (1e-5, 0.33, 1.0, 2.5, 43.0):
        assert fm.exp1(x) == pytest.approx(scipy.special.exp1(x), rel=1e-15)


def test_eigen_decomposition():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9, 16):
        a = rng.normal(size=(n, n))
        a = a + a.T
        values, vectors = fm.symmetric_eigen(a)
        vectors = np.array(vectors)
        np.testing.assert_allclose(values, np.linalg.eigvalsh(a), atol=1e-12)
        np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, a, atol=1e-12)
        np.testing.assert_allclose(vectors.T @ vectors, np.eye(n), atol=1e-13)


# ------------------------------------------------------------ radial integral


def test_radial_integral_against_quadrature():
    """The closed form equals a numerical integral of the GTO times j_l(kr),
    orthonormalised with an overlap matrix computed by quadrature too."""
    max_radial, radius = 4, 3.0
    module = radial_integral(max_angular=4, max_radial=max_radial, spline_accuracy=None)
    size = max_radial + 1
    widths = gto_gaussian_widths(size, radius)
    norm = [math.sqrt(2 / (w ** (2 * n + 3) * math.gamma(n + 1.5))) for n, w in enumerate(widths)]

    def quad(f):
        with warnings.catch_warnings():
            # quadpack warns that it cannot certify 1e-13; its result is still ~1e-14
            warnings.simplefilter("ignore", scipy.integrate.IntegrationWarning)
            return scipy.integrate.quad(f, 0, 80, epsabs=0, epsrel=1e-13, limit=500)[0]

    overlap = np.array(
        [
            [
                quad(
                    lambda r: norm[i] * norm[j] * r ** (2 + i + j)
                    * math.exp(-r * r / (2 * widths[i] ** 2) - r * r / (2 * widths[j] ** 2))
                )
                for j in range(size)
            ]
            for i in range(size)
        ]
    )
    values, vectors = np.linalg.eigh(overlap)
    orthonormalization = vectors @ np.diag(values**-0.5) @ vectors.T @ np.diag(norm)
    np.testing.assert_allclose(
        module.orthonormalization.numpy(),
        orthonormalization,
        rtol=0,
        atol=1e-12 * np.abs(orthonormalization).max(),
    )

    ks = np.array([0.0, 0.3, 1.0, 2.5, 3.7])
    integrals = module(torch.tensor(ks))
    for l in range(5):
        raw = np.array(
            [
                [
                    quad(
                        lambda r: r ** (2 + n) * math.exp(-r * r / (2 * widths[n] ** 2))
                        * scipy.special.spherical_jn(l, k * r)
                    )
                    for n in range(size)
                ]
                for k in ks
            ]
        )
        expected = raw @ orthonormalization.T
        error = np.abs(integrals[l].numpy() - expected).max() / np.abs(expected).max()
        assert error < 2e-12, (l, error)


def test_analytic_torch_equals_construction():
    module = radial_integral(max_angular=6, max_radial=9, spline_accuracy=None)
    k = np.concatenate([[0.0], np.linspace(1e-3, module.k_cutoff, 57)])
    integrals = module(torch.tensor(k))
    matrix = module.orthonormalization.numpy()
    for l in range(7):
        expected = _gto_integral(l, module.widths, matrix, k)[0]
        np.testing.assert_allclose(integrals[l].numpy(), expected, rtol=1e-15, atol=1e-300)


def test_spline_control_points():
    # the hyper-parameters of featomic's LODE examples (smearing 1, radius 3)
    module = radial_integral(exponent=1, max_angular=4, max_radial=3)
    assert module.n_points == [321, 321, 321, 161, 161]

    # the rule itself: the midpoint criterion holds for the final points, not for
    # the previous (every other) ones
    for l, n_points in enumerate(module.n_points):
        positions = module.spline_positions[l, :n_points].numpy()
        values = module.spline_values[l, :n_points].numpy()
        derivatives = module.spline_derivatives[l, :n_points].numpy()
        # the 11 initial points: start + i * step, and exactly the cutoff
        np.testing.assert_array_equal(
            positions[:: (n_points - 1) // 10],
            [i * (module.k_cutoff / 10) for i in range(10)] + [module.k_cutoff],
        )

        def criterion(p, v, d):
            mid = (p[:-1] + p[1:]) / 2
            exact = _gto_integral(l, module.widths, module.orthonormalization.numpy(), mid)[0]
            interpolated = _spline_evaluate(p, v, d, mid)
            absolute = np.abs(interpolated - exact).mean()
            relative = np.abs((interpolated - exact) / exact).mean()
            return absolute < 1e-8 or relative < 1e-8

        assert criterion(positions, values, derivatives)
        assert not criterion(positions[::2], values[::2], derivatives[::2])

    # the spline reproduces its control points, the analytic form elsewhere
    analytic = radial_integral(exponent=1, max_angular=4, max_radial=3, spline_accuracy=None)
    k = torch.linspace(0, module.k_cutoff, 1001, dtype=torch.float64)
    for spline, exact in zip(module(k), analytic(k)):
        assert (spline - exact).abs().max() < 1e-7 * exact.abs().max()
    control = module.spline_positions[0, : module.n_points[0]]
    torch.testing.assert_close(
        module(control[:-1])[0], module.spline_values[0, : module.n_points[0] - 1], rtol=0, atol=0
    )


def test_spline_interval():
    """The interval is featomic's: largest k with positions[k] <= x, at most P - 2."""
    from rascaline_e3nn._lode_radial import _interval

    module = radial_integral(max_angular=3, max_radial=1)
    for l, n_points in enumerate(module.n_points):
        positions = module.spline_positions[l, :n_points]
        x = torch.cat(
            [
                positions,
                (positions[:-1] + positions[1:]) / 2,
                torch.nextafter(positions, torch.tensor(-1.0, dtype=torch.float64)),
                torch.nextafter(positions, torch.tensor(10.0, dtype=torch.float64)),
                torch.rand(1000, dtype=torch.float64) * module.k_cutoff * 1.1,
                torch.tensor([0.0, -1e-300, -0.5], dtype=torch.float64),
            ]
        )
        expected = torch.searchsorted(positions, x, right=True) - 1
        expected = torch.clamp(expected, 0, n_points - 2)
        step = module.k_cutoff / (n_points - 1)
        assert torch.equal(_interval(positions, step, x), expected)


def test_spline_size_limit():
    featomic_torch = pytest.importorskip("featomic.torch")
    # 5121 points reach 1e-13; 1e-14 would need more than 10000
    assert radial_integral(max_angular=0, max_radial=3, spline_accuracy=1e-13).n_points == [5121]
    hypers = (density(1), basis(0, 3, spline_accuracy=1e-14))
    with pytest.raises(RuntimeError) as featomic_error:
        featomic_torch.LodeSphericalExpansion(density=hypers[0], basis=hypers[1])
    with pytest.raises(ValueError, match="failed to reach requested accuracy") as error:
        LodeRadialIntegral(**parse_hypers(*hypers))
    # same message, same mean errors
    assert str(error.value) in str(featomic_error.value)
    with pytest.raises(ValueError, match="spline_accuracy"):
        radial_integral(max_angular=0, max_radial=1, spline_accuracy=-1.0)


def test_l1_gradient_at_zero():
    """featomic special-cases dI_n1/dk at k = 0; autograd of the closed form agrees."""
    analytic = radial_integral(max_angular=3, max_radial=5, spline_accuracy=None)
    spline = radial_integral(max_angular=3, max_radial=5)
    k = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    for l in range(4):
        (value,) = analytic(k)[l]
        gradient = torch.stack(
            [torch.autograd.grad(v, k, retain_graph=True)[0][0] for v in value]
        )
        expected = spline.spline_derivatives[l, 0]
        # orthonormalisation cancels: compare relative to the largest entry
        scale = float(expected.abs().max()) if l == 1 else 1.0
        torch.testing.assert_close(gradient, expected, rtol=0, atol=1e-13 * scale)
        if l != 1:
            assert (expected == 0).all()


@pytest.mark.parametrize("spline_accuracy", [1e-8, None], ids=["spline", "analytic"])
def test_gradients(spline_accuracy):
    module = radial_integral(max_angular=3, max_radial=1, spline_accuracy=spline_accuracy)
    k = torch.tensor([0.0, 0.0123, 1.9113, 3.3333], dtype=torch.float64, requires_grad=True)
    def function(k):
        return torch.cat([v.reshape(-1) for v in module(k)])

    torch.autograd.gradcheck(function, (k,))
    torch.autograd.gradgradcheck(function, (k,), fast_mode=True)
    if spline_accuracy is not None:
        # the spline's own derivatives at its control points
        n_points = module.n_points[2]
        control = module.spline_positions[2, 10:n_points:37].clone().requires_grad_(True)
        values = module(control)[2]
        gradient = torch.autograd.grad(values.sum(), control)[0]
        expected = module.spline_derivatives[2, 10:n_points:37].sum(dim=1)
        torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ density


def density_mpmath(exponent, smearing, k):
    """rho_hat(k) = pi^(3/2) (2 s^2)^(p_eff/2) / Gamma(p/2) * Gamma(p_eff/2, x) / x^(p_eff/2),
    x = k^2 s^2 / 2, p_eff = 3 - p (Gaussian / Coulomb closed forms for p = 0, 1)."""
    mpmath.mp.dps = 40
    s2 = mpmath.mpf(smearing) ** 2
    result = []
    for kk in k:
        kk = mpmath.mpf(float(kk))
        if exponent == 0:
            value = (4 * mpmath.pi * s2) ** mpmath.mpf(0.75) * mpmath.exp(-kk * kk * s2 / 2)
        elif exponent == 1:
            value = 4 * mpmath.pi * mpmath.exp(-kk * kk * s2 / 2) / (kk * kk)
        else:
            p_eff = mpmath.mpf(3 - exponent)
            x = kk * kk * s2 / 2
            value = (
                mpmath.pi ** mpmath.mpf(1.5) * (2 * s2) ** (p_eff / 2)
                / mpmath.gamma(mpmath.mpf(exponent) / 2)
                * mpmath.gammainc(p_eff / 2, x) / x ** (p_eff / 2)
            )
        result.append(float(value))
    return np.array(result)


def test_featomic_erfc():
    from rascaline_e3nn._lode_radial import _featomic_erfc

    module = radial_integral(exponent=2, max_angular=0, max_radial=0)
    z = np.concatenate(
        [[0.0, 1e-12, 0.3, 0.5, 0.75], np.linspace(0.01, 27.0, 2000), [110.0, 200.0]]
    )
    actual = _featomic_erfc(
        torch.tensor(z), module.erf_numerators, module.erf_denominators, module.erf_intervals
    ).numpy()
    expected = np.array([fm.erfc(v) for v in z])
    # torch's exp may differ from the C library's by one ulp
    np.testing.assert_allclose(actual, expected, rtol=1e-15, atol=0)
    # featomic's approximation is accurate to ~1e-10 only (its constants b have 10 digits)
    np.testing.assert_allclose(expected, scipy.special.erfc(z), rtol=2e-10, atol=1e-300)


@pytest.mark.parametrize("exponent", range(10))
def test_density_fourier(exponent):
    smearing = 0.8
    module = LodeRadialIntegral(
        **parse_hypers(density(exponent, smearing=smearing), basis(0, 0)), featomic_erfc=False
    )
    k = np.concatenate([np.geomspace(1e-3, 1.0, 9), np.linspace(1.1, 12.0, 15)])
    actual = module.density_fourier(torch.tensor(k)).numpy()
    expected = density_mpmath(exponent, smearing, k)
    featomic = radial_integral(exponent=exponent, smearing=smearing, max_angular=0, max_radial=0)
    with_featomic_erfc = featomic.density_fourier(torch.tensor(k)).numpy()
    if exponent >= 2 and exponent % 2 == 0:
        # featomic's erfc (~1e-10), amplified by the cancellations of the closed forms
        below = k < 1.2 * math.pi / smearing
        np.testing.assert_allclose(with_featomic_erfc[below], expected[below], rtol=1e-7)
    else:
        np.testing.assert_array_equal(with_featomic_erfc, actual)
    # below the default cutoff (x = k^2 s^2 / 2 < (1.2 pi)^2 / 2): 5e-13 (1e-14 at small x);
    # beyond it featomic's closed forms cancel (e.g. exp(-x) - x E1(x))
    inside = k < 1.2 * math.pi / smearing
    np.testing.assert_allclose(actual[inside], expected[inside], rtol=5e-13)
    np.testing.assert_allclose(actual, expected, rtol=1e-10)

    if exponent in (3, 5, 7, 9):
        # the closed forms with scipy's exponential integral
        x = 0.5 * k**2 * smearing**2
        ei = scipy.special.expi(-x)
        value = {
            3: -ei,
            5: np.exp(-x) + x * ei,
            7: (1 - x) * np.exp(-x) / 2 - x**2 / 2 * ei,
            9: (x**2 - x + 2) * np.exp(-x) / 6 + x**3 / 6 * ei,
        }[exponent]
        p_eff = 3 - exponent
        factor = math.pi**1.5 * (2 * smearing**2) ** (0.5 * p_eff) / math.gamma(0.5 * exponent)
        np.testing.assert_allclose(actual[inside], factor * value[inside], rtol=1e-13)

    kt = torch.tensor([0.05, 1.3, 4.2], dtype=torch.float64, requires_grad=True)
    for m in (module, featomic):
        torch.autograd.gradcheck(m.density_fourier, (kt,))
        torch.autograd.gradgradcheck(m.density_fourier, (kt,))

    k32 = torch.tensor(k[:4], dtype=torch.float32)
    assert module.density_fourier(k32).dtype == torch.float32
    assert module(k32)[0].dtype == torch.float32


# ------------------------------------------------------------ k = 0 and centre terms


def test_center_contribution_pylode():
    """featomic's own test values (from pyLODE), max_radial 5, radius 5, smearing 1."""
    reference = {
        0: [7.09990773e-01, 6.13767550e-01, 3.34161655e-01, 8.35301652e-02, 1.78439072e-02, -3.44944648e-05],  # noqa: E501
        1: [1.69193719, 2.02389574, 2.85086136, 3.84013091, 1.62869125, 7.03338899],
        2: [1.00532822, 1.10024472, 1.34843326, 1.19816598, 0.69150744, 1.2765415],
        6: [0.03811939, 0.03741200, 0.03115835, 0.01364843, 0.00534184, 0.00205973],
    }
    for exponent, expected in reference.items():
        module = LodeRadialIntegral(
            max_angular=0, max_radial=5, radius=5.0, smearing=1.0, exponent=exponent,
            center_atom_weight=0.0, k_cutoff=1.2 * math.pi, spline_accuracy=None,
        )
        np.testing.assert_allclose(module.center_term.numpy(), expected, rtol=3e-6)
        weighted = LodeRadialIntegral(
            max_angular=0, max_radial=5, radius=5.0, smearing=1.0, exponent=exponent,
            center_atom_weight=0.25, k_cutoff=1.2 * math.pi, spline_accuracy=None,
        )
        np.testing.assert_allclose(
            weighted.center_term.numpy(), 0.75 * module.center_term.numpy(), rtol=1e-15
        )
        unweighted = LodeRadialIntegral(
            max_angular=0, max_radial=5, radius=5.0, smearing=1.0, exponent=exponent,
            center_atom_weight=1.0, k_cutoff=1.2 * math.pi, spline_accuracy=None,
        )
        assert (unweighted.center_term == 0).all()


@pytest.mark.parametrize("exponent", range(10))
def test_k0_term(exponent):
    for accuracy in (1e-8, None):
        module = radial_integral(exponent=exponent, max_angular=1, spline_accuracy=accuracy)
        at_zero = module(torch.zeros(1, dtype=torch.float64))[0][0]
        if exponent == 0 or exponent > 3:
            expected = k0_factor(exponent, module.smearing) * at_zero
            torch.testing.assert_close(module.k0_term, expected, rtol=0, atol=0)
            assert (module.k0_term != 0).all()
        else:
            assert (module.k0_term == 0).all()


# ------------------------------------------------------------ hyper-parameters


def test_parse_hypers_defaults():
    hypers = parse_hypers(
        {"type": "SmearedPowerLaw", "smearing": 0.5, "exponent": 1},
        {"type": "TensorProduct", "max_angular": 2,
         "radial": {"type": "Gto", "max_radial": 3, "radius": 4.0}},
    )
    assert hypers == {
        "max_angular": 2, "max_radial": 3, "radius": 4.0, "smearing": 0.5, "exponent": 1,
        "center_atom_weight": 1.0, "k_cutoff": 1.2 * math.pi / 0.5, "spline_accuracy": 1e-8,
    }
    hypers = parse_hypers(density(2), basis(1, 1, spline_accuracy=None), k_cutoff=3.0)
    assert hypers["spline_accuracy"] is None and hypers["k_cutoff"] == 3.0


@pytest.mark.parametrize(
    "density_, basis_, culprit",
    [
        ({"type": "Gaussian", "width": 0.3}, basis(1, 1), "Gaussian"),
        ({**density(1), "scaling": {"type": "Willatt2018", "scale": 1, "rate": 1, "exponent": 1}},
         basis(1, 1), "scaling"),
        (density(10), basis(1, 1), "exponent"),
        (density(-1), basis(1, 1), "exponent"),
        ({"type": "SmearedPowerLaw", "exponent": 1}, basis(1, 1), "smearing"),
        ({"smearing": 1.0, "exponent": 1}, basis(1, 1), "type"),
        (density(1), {**basis(1, 1), "type": "Explicit"}, "Explicit"),
        (density(1), {**basis(1, 1), "radial": {"type": "Tabulated", "file": "x"}}, "Tabulated"),
        (density(1), {"type": "TensorProduct", "radial": basis(1, 1)["radial"]}, "max_angular"),
        (density(1), {**basis(1, 1), "radial": {"type": "Gto", "radius": 3.0}}, "max_radial"),
        (density(1), {**basis(1, 1), "radial": {"type": "Gto", "max_radial": 3}}, "radius"),
        (density(1), {**basis(1, 1), "cutoff": 3.0}, "cutoff"),
    ],
)
def test_parse_hypers_errors(density_, basis_, culprit):
    with pytest.raises(ValueError, match=culprit):
        LodeRadialIntegral(**parse_hypers(density_, basis_))


def test_script():
    for exponent, accuracy in ((4, 1e-8), (5, None)):
        module = radial_integral(exponent=exponent, max_angular=3, max_radial=2,
                                 spline_accuracy=accuracy, center_atom_weight=0.5)
        scripted = torch.jit.script(module)
        k = torch.linspace(0.01, module.k_cutoff, 17, dtype=torch.float64)
        for a, b in zip(module(k), scripted(k)):
            assert torch.equal(a, b)
        assert torch.equal(module.density_fourier(k), scripted.density_fourier(k))
        assert torch.equal(module.k0_term, scripted.k0_term)
        assert torch.equal(module.center_term, scripted.center_term)


# ------------------------------------------------------------ against featomic


def random_system(seed, n_atoms, atom_types):
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(4.0, 6.0, 3)) + rng.uniform(-1.0, 1.0, (3, 3))
    positions = rng.uniform(0.0, 1.0, (n_atoms, 3)) @ cell + rng.normal(0, 0.3, (n_atoms, 3))
    types = np.array(atom_types * (n_atoms // len(atom_types) + 1))[:n_atoms]
    rng.shuffle(types)
    return positions, cell, types


def test_featomic_harmonics_convention():
    """featomic's l = 1 harmonics are proportional to (y, z, x)."""
    directions = np.random.default_rng(1).normal(size=(5, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    y = real_spherical_harmonics(1, directions)
    np.testing.assert_allclose(y, math.sqrt(3 / (4 * math.pi)) * directions[:, [1, 2, 0]],
                               atol=1e-15)


def test_k_vectors_half_space():
    _, cell, _ = random_system(3, 4, [1])
    norms, directions = k_vectors(cell, 3.0)
    assert (norms < 3.0).all()
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0, atol=1e-15)
    k = norms[:, None] * directions
    # together with their opposites, all lattice points of the sphere but 0, once
    n = np.round(k @ cell.T / (2 * math.pi)).astype(int)
    full = {tuple(v) for v in n} | {tuple(-v) for v in n}
    assert len(full) == 2 * len(n)
    lattice = 2 * math.pi * np.linalg.inv(cell.T)
    grid = np.array(np.meshgrid(*[np.arange(-12, 13)] * 3)).reshape(3, -1).T
    inside = {tuple(v) for v in grid if 0 < np.linalg.norm(v @ lattice) < 3.0}
    assert inside == full


#: (exponent, spline_accuracy, center_atom_weight, max_angular, max_radial, smearing,
#:  radius, seed, n_atoms, types)
FEATOMIC_CASES = [
    (0, 1e-8, 1.0, 4, 3, 1.0, 3.0, 0, 5, [1, 8]),
    (1, 1e-8, 0.3, 6, 4, 1.0, 3.0, 1, 6, [1, 8, 11]),
    (2, 1e-8, 1.0, 3, 3, 1.2, 3.5, 2, 4, [1, 8]),
    (3, 1e-8, 0.3, 4, 5, 1.0, 3.0, 3, 7, [1, 8, 11]),
    (4, 1e-8, 0.3, 3, 3, 0.9, 2.5, 4, 5, [8, 11]),
    (5, 1e-8, 1.0, 2, 2, 1.0, 3.0, 5, 4, [1, 8]),
    (6, 1e-8, 0.3, 4, 3, 1.1, 3.0, 6, 8, [1, 8, 11]),
    (7, 1e-8, 0.3, 3, 2, 1.0, 4.0, 7, 5, [1, 8]),
    (8, 1e-8, 1.0, 2, 3, 1.0, 3.0, 8, 4, [1, 11]),
    (9, 1e-8, 0.3, 3, 3, 1.0, 3.0, 9, 6, [1, 8, 11]),
    (1, 1e-5, 0.3, 3, 3, 1.0, 3.0, 10, 5, [1, 8]),
    (0, None, 0.3, 4, 3, 1.0, 3.0, 11, 5, [1, 8]),
    (1, None, 1.0, 6, 8, 1.0, 3.0, 12, 6, [1, 8, 11]),
    (2, None, 0.3, 2, 2, 1.0, 3.0, 13, 4, [1, 8]),
    (3, None, 0.3, 5, 4, 0.8, 3.0, 14, 5, [1, 8]),
    (4, None, 1.0, 3, 3, 1.0, 3.0, 15, 6, [8, 11]),
    (5, None, 0.3, 3, 3, 1.0, 3.0, 16, 5, [1, 8, 11]),
    (6, None, 0.3, 4, 3, 1.0, 3.0, 17, 4, [1, 8]),
    # smearing small against the GTO widths: the centre term's 2F1 at x >= 0.75
    (2, 1e-8, 0.0, 1, 5, 0.5, 5.0, 18, 4, [1, 8]),
    (7, None, 0.0, 1, 5, 0.5, 5.0, 19, 4, [1, 8]),
]


@pytest.mark.parametrize(
    "case", FEATOMIC_CASES, ids=lambda c: f"p{c[0]}-{'spline' if c[1] else 'analytic'}-w{c[2]}"
)
def test_against_featomic(case):
    check_against_featomic(case, featomic_erfc=True, tolerance=1e-12)


def test_against_featomic_torch_erfc():
    """With torch's accurate erfc, even exponents differ from featomic by ~1e-10."""
    for case in FEATOMIC_CASES:
        if case[0] == 4 and case[1] is not None:
            check_against_featomic(case, featomic_erfc=False, tolerance=1e-9)


def check_against_featomic(case, featomic_erfc, tolerance):
    featomic_torch = pytest.importorskip("featomic.torch")
    from metatomic.torch import System

    (exponent, accuracy, weight, max_angular, max_radial, smearing, radius,
     seed, n_atoms, atom_types) = case
    positions, cell, types = random_system(seed, n_atoms, atom_types)
    density_ = density(exponent, smearing=smearing, center_atom_weight=weight)
    basis_ = basis(max_angular, max_radial, radius=radius, spline_accuracy=accuracy)

    calculator = featomic_torch.LodeSphericalExpansion(density=density_, basis=basis_)
    system = System(
        types=torch.tensor(types, dtype=torch.int32),
        positions=torch.tensor(positions, dtype=torch.float64),
        cell=torch.tensor(cell, dtype=torch.float64),
        pbc=torch.tensor([True, True, True]),
    )
    expected = calculator([system])

    module = LodeRadialIntegral(**parse_hypers(density_, basis_), featomic_erfc=featomic_erfc)
    actual = lode_expansion(positions, cell, types, module)

    scale = max(float(block.values.abs().max()) for block in expected.blocks())
    assert len(actual) == len(expected.keys)
    for key, block in expected.items():
        l, _, center_type, neighbor_type = (int(v) for v in key.values)
        reference = block.values.numpy()
        ours = actual[(l, center_type, neighbor_type)]
        assert ours.shape == reference.shape
        denominator = np.abs(reference).max()
        if denominator == 0.0:
            # e.g. odd l with a single atom of a type: sin(0)
            assert np.abs(ours).max() <= 1e-14 * scale
            continue
        error = np.abs(ours - reference).max() / denominator
        assert error <= tolerance, (key, error)
