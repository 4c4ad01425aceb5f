"""The radial part of featomic's LODE spherical expansion, in PyTorch.

:class:`LodeRadialIntegral` evaluates, for a set of k-vector norms, the radial
integrals ``I_nl(k)`` of featomic's ``LodeSphericalExpansion`` (GTO radial basis,
orthonormalised with ``S^(-1/2)``) and the Fourier transform ``rho_hat(k)`` of its
smeared power-law density, as featomic 0.6.7 computes them
(``featomic/src/calculators/lode``): the same cubic Hermite spline and control points
when ``spline_accuracy`` is set, the same closed form with the confluent
hypergeometric function otherwise. It also holds the two k-independent vectors the
expansion needs: the k = 0 contribution and the centre-atom contribution.

Everything derived at construction is computed in float64 with ports of featomic's own
special functions (:mod:`rascaline_e3nn._featomic_math`), in featomic's order of
operations. ``forward`` and ``density_fourier`` use torch operations only: they are
differentiable with respect to ``k`` (twice), scriptable, and run on any device with
float64 support (they compute in float64 and return ``k``'s dtype). The spline path
and ``density_fourier`` have no data-dependent control flow, hence no device
synchronisation; the closed form (``spline_accuracy=None``) iterates its series until
every element has converged.
"""

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import _featomic_math as fm

__all__ = ["LodeRadialIntegral", "parse_hypers"]

MAX_SPLINE_SIZE = 10_000
"""featomic's maximal number of control points in a spline."""



# ----------------------------------------------------------------------------------
# hyper-parameters
# ----------------------------------------------------------------------------------


def _require(mapping: dict, key: str, where: str):
    if key not in mapping:
        raise ValueError(f"missing '{key}' in the {where} hyper-parameters")
    return mapping[key]


def _check_keys(mapping: dict, allowed: Tuple[str, ...], where: str):
    for key in mapping:
        if key not in allowed:
            raise ValueError(f"unknown key '{key}' in the {where} hyper-parameters")


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"'{name}' must be an integer, got {value!r}")
    return int(value)


def _as_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"'{name}' must be a number, got {value!r}")
    return float(value)


def parse_hypers(density: dict, basis: dict, k_cutoff: Optional[float] = None) -> Dict:
    """Validate featomic-style LODE hyper-parameters, return :class:`LodeRadialIntegral`'s.

    Accepts what featomic's ``LodeSphericalExpansion`` accepts for a GTO basis, with
    featomic's defaults (``center_atom_weight = 1``, ``spline_accuracy = 1e-8``,
    ``k_cutoff = 1.2 pi / smearing``) and refuses, with a :class:`ValueError` naming the
    culprit, what this implementation does not support.

    Parameters
    ----------
    density : dict
        ``{"type": "SmearedPowerLaw", "smearing": float, "exponent": int,
        "center_atom_weight": float (optional)}``. A ``"scaling"`` is refused (featomic
        refuses it for LODE too).
    basis : dict
        ``{"type": "TensorProduct", "max_angular": int, "radial": {"type": "Gto",
        "max_radial": int, "radius": float}, "spline_accuracy": float or None
        (optional)}``.
    k_cutoff : float, optional
        Reciprocal-space cutoff; ``None`` gives featomic's default.

    Returns
    -------
    dict
        The keyword arguments of :class:`LodeRadialIntegral`.
    """
    if not isinstance(density, dict):
        raise ValueError(f"the density hyper-parameters must be a dict, got {density!r}")
    if not isinstance(basis, dict):
        raise ValueError(f"the basis hyper-parameters must be a dict, got {basis!r}")

    density_type = _require(density, "type", "density")
    if density_type != "SmearedPowerLaw":
        raise ValueError(
            f"density type '{density_type}' is not supported: LODE needs 'SmearedPowerLaw'"
        )
    if density.get("scaling") is not None:
        raise ValueError("density 'scaling' is not supported by LODE")
    _check_keys(
        density, ("type", "smearing", "exponent", "scaling", "center_atom_weight"), "density"
    )
    smearing = _as_float(_require(density, "smearing", "density"), "smearing")
    exponent = _as_int(_require(density, "exponent", "density"), "exponent")
    center_atom_weight = _as_float(density.get("center_atom_weight", 1.0), "center_atom_weight")

    basis_type = _require(basis, "type", "basis")
    if basis_type != "TensorProduct":
        raise ValueError(
            f"basis type '{basis_type}' is not supported: only 'TensorProduct' is"
        )
    _check_keys(basis, ("type", "max_angular", "radial", "spline_accuracy"), "basis")
    max_angular = _as_int(_require(basis, "max_angular", "basis"), "max_angular")
    radial = _require(basis, "radial", "basis")
    if not isinstance(radial, dict):
        raise ValueError(f"the radial basis must be a dict, got {radial!r}")
    radial_type = _require(radial, "type", "radial basis")
    if radial_type != "Gto":
        raise ValueError(
            f"radial basis type '{radial_type}' is not supported: only 'Gto' is"
        )
    _check_keys(radial, ("type", "max_radial", "radius"), "radial basis")
    max_radial = _as_int(_require(radial, "max_radial", "radial basis"), "max_radial")
    radius = _as_float(_require(radial, "radius", "radial basis"), "radius")

    if "spline_accuracy" in basis:
        spline_accuracy = basis["spline_accuracy"]
        if spline_accuracy is not None:
            spline_accuracy = _as_float(spline_accuracy, "spline_accuracy")
    else:
        spline_accuracy = 1e-8

    if k_cutoff is not None:
        k_cutoff = _as_float(k_cutoff, "k_cutoff")
    else:
        k_cutoff = 1.2 * math.pi / smearing

    return {
        "max_angular": max_angular,
        "max_radial": max_radial,
        "radius": radius,
        "smearing": smearing,
        "exponent": exponent,
        "center_atom_weight": center_atom_weight,
        "k_cutoff": k_cutoff,
        "spline_accuracy": spline_accuracy,
    }


# ----------------------------------------------------------------------------------
# construction (float64 numpy, featomic's order of operations)
# ----------------------------------------------------------------------------------


def gto_gaussian_widths(size: int, radius: float) -> List[float]:
    """``sigma_n = radius * max(sqrt(n), 1) / size`` for ``n < size``."""
    return [radius * max(math.sqrt(float(n)), 1.0) / float(size) for n in range(size)]


def gto_overlap(size: int, radius: float) -> np.ndarray:
    """Overlap matrix of the normalised GTOs (``GtoRadialBasis::overlap``)."""
    widths = gto_gaussian_widths(size, radius)
    overlap = np.zeros((size, size))
    for n1 in range(size):
        sigma1 = widths[n1]
        sigma1_sq = sigma1 * sigma1
        for n2 in range(n1, size):
            sigma2 = widths[n2]
            sigma2_sq = sigma2 * sigma2
            e = 0.5 * (3.0 + float(n1) + float(n2))
            value = (
                math.pow(0.5 / sigma1_sq + 0.5 / sigma2_sq, -e)
                / (fm.powi(sigma1, n1) * fm.powi(sigma2, n2))
                * fm.gamma(e)
                / (
                    math.pow(sigma1 * sigma2, 1.5)
                    * math.sqrt(fm.gamma(float(n1) + 1.5) * fm.gamma(float(n2) + 1.5))
                )
            )
            overlap[n2, n1] = value
            overlap[n1, n2] = value
    return overlap


def gto_orthonormalization(size: int, radius: float) -> np.ndarray:
    """``S^(-1/2) diag(normalisation)`` as featomic builds it.

    The result ``M`` maps the vector of integrals against the (unnormalised) GTOs to
    the orthonormal basis: ``I_orthonormal[j] = sum_i M[j, i] I[i]``.

    Parameters
    ----------
    size : int
        Number of radial functions (``max_radial + 1``).
    radius : float
        GTO radius.

    Returns
    -------
    numpy.ndarray
        ``[size, size]``.
    """
    widths = gto_gaussian_widths(size, radius)
    normalization = [
        math.sqrt(2.0 / (fm.powi(sigma, 2 * n + 3) * fm.gamma(float(n) + 1.5)))
        for n, sigma in enumerate(widths)
    ]
    eigenvalues, eigenvectors = fm.symmetric_eigen(gto_overlap(size, radius))
    for n in range(size):
        if eigenvalues[n] <= fm.EPSILON:
            raise ValueError(
                "radial overlap matrix is singular, try with a lower max_radial "
                f"(current value is {size - 1})"
            )
        eigenvalues[n] = 1.0 / math.sqrt(eigenvalues[n])
    vectors = np.array(eigenvectors)
    recomposed = fm.gemm(fm.gemm(vectors, np.diag(eigenvalues)), vectors.T)
    return fm.gemm(recomposed, np.diag(normalization))


def _gto_integral(
    o3_lambda: int,
    widths: List[float],
    orthonormalization: np.ndarray,
    k: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray]:
    """featomic's ``LodeRadialIntegralGto::compute`` for many ``k`` at once.

    Returns the values and derivatives with respect to ``k``, ``[K, size]`` each,
    orthonormalised.
    """
    k = np.asarray(k, dtype=np.float64)
    size = len(widths)
    values = np.zeros((k.shape[0], size))
    gradients = np.zeros((k.shape[0], size))
    global_factor = math.sqrt(math.pi) / fm.SQRT_2
    l = o3_lambda
    with np.errstate(divide="ignore", invalid="ignore"):
        for n in range(size):
            sigma = widths[n]
            k_sigma_sqrt2 = k * sigma / fm.SQRT_2
            factor = (
                global_factor * fm.powi(sigma, n + 3) * fm.powi(fm.SQRT_2, n)
            ) * fm.powi_array(k_sigma_sqrt2, l)
            k_sigma_2 = -k * sigma * sigma
            z = 0.5 * k * k_sigma_2

            a = 0.5 * float(n + l + 3)
            b = float(l) + 1.5
            ratio = fm.gamma(a) / fm.gamma(b)
            value = ratio * fm.hyp1f1(a, b, z)
            gradient = ratio * (a / b * fm.hyp1f1(a + 1.0, b + 1.0, z))

            value = value * factor
            gradient = gradient * (k_sigma_2 * factor)
            gradient = gradient + float(l) / k * value
            values[:, n] = value
            gradients[:, n] = gradient

    at_zero = k == 0.0
    if at_zero.any():
        gradients[at_zero] = 0.0
        if l == 1:
            for n in range(size):
                sigma = widths[n]
                a = 0.5 * float(n + l) + 1.5
                b = 2.5
                factor = (
                    global_factor
                    * fm.powi(sigma, n + l + 3)
                    * fm.powi(fm.SQRT_2, n - l)
                )
                gradients[at_zero, n] = fm.gamma(a) / fm.gamma(b) * factor

    values = fm.rows_dot(orthonormalization, values)
    gradients = fm.rows_dot(orthonormalization, gradients)
    return values, gradients


def _spline_evaluate(
    positions: np.ndarray,
    values: np.ndarray,
    derivatives: np.ndarray,
    x: np.ndarray,
) -> np.ndarray:
    """featomic's ``HermitCubicSpline::compute`` (values only) for many ``x``."""
    k = np.searchsorted(positions, x, side="right") - 1
    k = np.clip(k, 0, positions.shape[0] - 2)
    x_k = positions[k]
    x_k_1 = positions[k + 1]
    delta = x_k_1 - x_k
    t = (x - x_k) / delta
    t_2 = t * t
    t_3 = t_2 * t
    h00 = 2.0 * t_3 - 3.0 * t_2 + 1.0
    h10 = t_3 - 2.0 * t_2 + t
    h01 = -2.0 * t_3 + 3.0 * t_2
    h11 = t_3 - t_2
    h00, h10, h01, h11, delta = (v[:, None] for v in (h00, h10, h01, h11, delta))
    return (
        h00 * values[k]
        + h10 * delta * derivatives[k]
        + h01 * values[k + 1]
        + h11 * delta * derivatives[k + 1]
    )


def _rust_exp(value: float) -> str:
    """``value`` as Rust's ``{:e}`` writes it (shortest digits, e.g. ``1.5e-14``)."""
    text = np.format_float_scientific(float(value), unique=True, trim="-")
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def spline_with_accuracy(function, start: float, stop: float, accuracy: float):
    """featomic's ``HermitCubicSpline::with_accuracy``.

    11 uniform control points on ``[start, stop]``, then the midpoints of every
    interval are added until the mean absolute error or the mean relative error of the
    spline at these midpoints (before adding them) is below ``accuracy``.

    Parameters
    ----------
    function : callable
        ``function(x [P]) -> (values [P, N], derivatives [P, N])``.
    start, stop : float
        Interval.
    accuracy : float
        Target accuracy.

    Returns
    -------
    positions : numpy.ndarray
        ``[P]`` control points, increasing.
    values, derivatives : numpy.ndarray
        ``[P, N]``.

    Raises
    ------
    ValueError
        For a negative accuracy, or when more than ``MAX_SPLINE_SIZE`` points would be
        needed (featomic's error message).
    """
    if accuracy < 0.0:
        raise ValueError(
            f"got invalid accuracy in spline ({accuracy}), it must be positive"
        )
    initial_grid_size = 11
    grid_step = (stop - start) / float(initial_grid_size - 1)
    positions = [start + float(k) * grid_step for k in range(initial_grid_size - 1)]
    positions.append(stop)
    positions = np.array(positions)
    values, derivatives = function(positions)

    while True:
        midpoints = (positions[:-1] + positions[1:]) / 2.0
        new_values, new_derivatives = function(midpoints)
        interpolated = _spline_evaluate(positions, values, derivatives, midpoints)
        with np.errstate(divide="ignore", invalid="ignore"):
            absolute = np.abs(interpolated - new_values).ravel()
            relative = np.abs((interpolated - new_values) / new_values).ravel()
        count = float(absolute.shape[0])
        # sequential sums, in featomic's order (midpoints, then basis functions)
        mean_absolute = np.cumsum(absolute)[-1] / count
        mean_relative = np.cumsum(relative)[-1] / count
        if mean_absolute < accuracy or mean_relative < accuracy:
            break
        if positions.shape[0] + midpoints.shape[0] > MAX_SPLINE_SIZE:
            raise ValueError(
                f"failed to reach requested accuracy ({_rust_exp(accuracy)}) in spline "
                f"interpolation, mean absolute error is {_rust_exp(mean_absolute)} and "
                f"mean relative error is {_rust_exp(mean_relative)}"
            )
        n_old = positions.shape[0]
        merged_positions = np.empty(2 * n_old - 1)
        merged_positions[0::2] = positions
        merged_positions[1::2] = midpoints
        shape = (2 * n_old - 1, values.shape[1])
        merged_values = np.empty(shape)
        merged_values[0::2] = values
        merged_values[1::2] = new_values
        merged_derivatives = np.empty(shape)
        merged_derivatives[0::2] = derivatives
        merged_derivatives[1::2] = new_derivatives
        positions, values, derivatives = merged_positions, merged_values, merged_derivatives

    return positions, values, derivatives


def center_contribution(
    widths: List[float],
    orthonormalization: np.ndarray,
    smearing: float,
    exponent: int,
) -> np.ndarray:
    """featomic's ``get_center_contribution``: the centre atom's own ``<n 0 0>``.

    Parameters
    ----------
    widths : list of float
        GTO widths.
    orthonormalization : numpy.ndarray
        From :func:`gto_orthonormalization`.
    smearing : float
    exponent : int

    Returns
    -------
    numpy.ndarray
        ``[size]``, orthonormalised.
    """
    size = len(widths)
    p = float(exponent)
    contrib = np.zeros(size)
    n_eff = [0.5 * (3.0 + float(n)) for n in range(size)]
    if p == 0.0:
        factor = math.pow(math.pi, -0.25) / math.pow(smearing * smearing, 0.75)
        for n in range(size):
            alpha = 0.5 * (
                1.0 / (smearing * smearing) + 1.0 / (widths[n] * widths[n])
            )
            contrib[n] = factor * fm.gamma(n_eff[n]) / math.pow(alpha, n_eff[n])
    else:
        factor = 2.0 * math.sqrt(4.0 * math.pi) / fm.gamma(p / 2.0) / p
        for n in range(size):
            s = smearing / widths[n]
            hyparg = 1.0 / (1.0 + s * s)
            contrib[n] = (
                factor
                * math.pow(2.0, (1.0 + float(n) - p) / 2.0)
                * fm.powi(smearing, 3 + n - exponent)
                * fm.gamma(n_eff[n])
                * fm.hyp2f1(1.0, n_eff[n], (p + 2.0) / 2.0, hyparg)
                * math.pow(hyparg, n_eff[n])
            )
    return fm.rows_dot(orthonormalization, contrib[None, :])[0]


def k0_factor(exponent: int, smearing: float) -> float:
    """The factor of featomic's ``compute_k0_contributions`` (zero for exponents 1-3)."""
    if exponent == 0:
        smearing_squared = smearing * smearing
        return (
            math.pow(2.0 * math.pi * smearing_squared, 1.5)
            / math.pow(math.pi * smearing_squared, 0.75)
            / math.sqrt(4.0 * math.pi)
        )
    elif exponent > 3:
        p_eff = 3.0 - float(exponent)
        return (
            0.5
            * math.pi
            * math.pow(2.0, p_eff)
            / fm.gamma(0.5 * float(exponent))
            * math.pow(2.0, (float(exponent) - 1.0) / 2.0)
            / -p_eff
            * math.pow(smearing, -p_eff)
            / math.pow(smearing, 2.0 * float(exponent) - 6.0)
        )
    return 0.0


# ----------------------------------------------------------------------------------
# runtime (torch operations only)
# ----------------------------------------------------------------------------------


def _powi(x: torch.Tensor, n: int) -> torch.Tensor:
    """Rust's ``powi`` (repeated squaring) for a non-negative integer exponent."""
    b = n
    r = torch.ones_like(x)
    a = x
    first = True
    while True:
        if b % 2 == 1:
            if first:
                r = a
                first = False
            else:
                r = r * a
        b = b // 2
        if b == 0:
            break
        a = a * a
    return r


def _series_1f1(a: float, b: float, x: torch.Tensor) -> torch.Tensor:
    """``hyp1f1_series`` of featomic with per-element convergence."""
    term = torch.ones_like(x)
    result = torch.ones_like(x)
    active = torch.ones_like(x, dtype=torch.bool)
    converged = False
    for k_int in range(1000):
        k = float(k_int)
        new_term = term * ((a + k) * x / (b + k) / (k + 1.0))
        term = torch.where(active, new_term, term)
        result = torch.where(active, result + term, result)
        # 2.220446049250313e-16: f64::EPSILON
        active = active & ~(term.abs() <= 2.220446049250313e-16 * result.abs())
        if not bool(active.any()):
            converged = True
            break
    if not converged:
        result = torch.where(active, torch.full_like(result, math.nan), result)
    return result


def _power_series_1f1(a: float, b: float, x: torch.Tensor) -> torch.Tensor:
    """The 500-term power series of featomic's ``chgm_fortran``."""
    result = torch.ones_like(x)
    term = torch.ones_like(x)
    active = torch.ones_like(x, dtype=torch.bool)
    for j_int in range(1, 501):
        j = float(j_int)
        new_term = term * ((a + j - 1.0) / (j * (b + j - 1.0)) * x)
        term = torch.where(active, new_term, term)
        result = torch.where(active, result + term, result)
        safe = torch.where(result != 0.0, result, torch.ones_like(result))
        done = (result != 0.0) & ((term / safe).abs() < 1e-15)
        active = active & ~done
        if not bool(active.any()):
            break
    return result


def _asymptotic_series_1f1(a: float, b: float, x: torch.Tensor) -> torch.Tensor:
    """The 50-term series of featomic's ``chgm_fortran`` for ``x >= 500``."""
    result = torch.ones_like(x)
    term = torch.ones_like(x)
    active = torch.ones_like(x, dtype=torch.bool)
    for j_int in range(1, 51):
        j = float(j_int)
        new_term = term * ((j - a) * (b - a + j - 1.0) / (j * x))
        term = torch.where(active, new_term, term)
        result = torch.where(active, result + term, result)
        safe = torch.where(result != 0.0, result, torch.ones_like(result))
        done = (result != 0.0) & ((term / safe).abs() < 1e-15)
        active = active & ~done
        if not bool(active.any()):
            break
    return result


def hyp1f1_constants(a: float, b: float) -> List[float]:
    """The ``x``-independent numbers of featomic's ``chgm_fortran`` for ``x < 0``.

    For each of its (at most two) passes: ``gamma(a')``, ``gamma(b)``,
    ``ln_gamma(b) - ln_gamma(b - a')``, ``exp(ln_gamma(b) - ln_gamma(a'))`` and
    ``cos(pi a')``, with ``a'`` the shifted parameter of that pass; computed here with
    featomic's gamma functions so that the torch code needs no special functions.
    """
    a = b - a
    a0 = a
    nl = 0
    if a >= 2.0:
        nl = 1
        a = a - float(int(a)) - 1.0
    constants: List[float] = []
    for _ in range(nl + 1):
        if a0 >= 2.0:
            a += 1.0
        ln_gamma_a = fm.ln_gamma(a)
        ln_gamma_b = fm.ln_gamma(b)
        ln_gamma_ba = fm.ln_gamma(b - a)
        exponent = ln_gamma_b - ln_gamma_a
        constants += [
            fm.gamma(a),
            fm.gamma(b),
            ln_gamma_b - ln_gamma_ba,
            0.0 if exponent == -math.inf else math.exp(exponent),
            math.cos(math.pi * a),
        ]
    constants += [0.0] * (10 - len(constants))
    return constants


def _chgm_negative(
    a: float, b: float, x0: torch.Tensor, constants: List[float]
) -> torch.Tensor:
    """featomic's ``chgm_fortran`` for ``x0 < 0`` (all elements)."""
    a = b - a
    a0 = a
    x = -x0
    nl = 0
    la = 0
    if a >= 2.0:
        nl = 1
        la = int(a)
        a = a - float(la) - 1.0

    y0 = torch.zeros_like(x)
    y1 = torch.zeros_like(x)
    result = torch.zeros_like(x)
    for n in range(nl + 1):
        if a0 >= 2.0:
            a += 1.0
        if a < 0.0:
            series = torch.ones_like(x, dtype=torch.bool)
        else:
            series = x <= abs(b) + 30.0
        small = series & (x < 500.0)
        large = series & ~(x < 500.0)
        other = ~series
        result = torch.zeros_like(x)
        if bool(small.any()):
            xs = torch.where(small, x, torch.ones_like(x))
            x0s = torch.where(small, x0, -torch.ones_like(x))
            value = _power_series_1f1(a, b, xs) * torch.exp(x0s)
            result = torch.where(small, value, result)
        if bool(large.any()):
            xl = torch.where(large, x, torch.full_like(x, 1000.0))
            value = _asymptotic_series_1f1(a, b, xl)
            gamma_a = constants[5 * n]
            gamma_b = constants[5 * n + 1]
            value = value * (torch.pow(xl, a - b) * gamma_b / gamma_a)
            result = torch.where(large, value, result)
        if bool(other.any()):
            xo = torch.where(other, x, torch.full_like(x, abs(b) + 31.0))
            x0o = -xo
            ln_gamma_b_minus_ba = constants[5 * n + 2]
            e2 = constants[5 * n + 3]
            cos_pi_a = constants[5 * n + 4]
            sum_1 = torch.ones_like(x)
            sum_2 = torch.ones_like(x)
            term_1 = torch.ones_like(x)
            term_2 = torch.ones_like(x)
            for i_int in range(1, 31):
                i = float(i_int)
                term_1 = -term_1 * (a + i - 1.0) * (a - b + i) / (xo * i)
                term_2 = -term_2 * (b - a + i - 1.0) * (a - i) / (xo * i)
                sum_1 = sum_1 + term_1
                sum_2 = sum_2 + term_2
            hg1 = (
                torch.exp(ln_gamma_b_minus_ba + x0o)
                * torch.pow(xo, -a)
                * cos_pi_a
                * sum_1
            )
            hg2 = e2 * torch.pow(xo, a - b) * sum_2
            result = torch.where(other, hg1 + hg2, result)
        if n == 0:
            y0 = result
        if n == 1:
            y1 = result

    if a0 >= 2.0:
        for _ in range(1, la):
            result = ((a * 2.0 - b + x) * y1 + (b - a) * y0) / a
            y0 = y1
            y1 = result
            a += 1.0
    return result


def _hyp1f1(a: float, b: float, x: torch.Tensor, constants: List[float]) -> torch.Tensor:
    """featomic's 1F1(a, b, x) for ``x <= 0``, in differentiable torch operations.

    ``constants`` are :func:`hyp1f1_constants` ``(a, b)``.
    """
    if a == 0.0:
        return torch.ones_like(x)
    if a == -1.0:
        result = 1.0 - x / b
    elif a == b:
        result = torch.exp(x)
    elif a - b == 1.0:
        result = (1.0 + x / b) * torch.exp(x)
    else:
        series = (abs(a) + 1.0) * x.abs() < 0.9 * b
        result = torch.zeros_like(x)
        if bool(series.any()):
            xs = torch.where(series, x, torch.zeros_like(x))
            result = torch.where(series, _series_1f1(a, b, xs), result)
        rest = ~series
        if bool(rest.any()):
            xr = torch.where(rest, x, torch.full_like(x, -(0.9 * b / (abs(a) + 1.0)) - 1.0))
            result = torch.where(rest, _chgm_negative(a, b, xr, constants), result)
    # featomic returns 1 for x == 0: so do all the branches above (the series stops at
    # its first term), and their derivatives at 0 stay right
    return result


def _exp1(x: torch.Tensor) -> torch.Tensor:
    """featomic's E1(x) = -Ei(-x) for ``x > 0``, in differentiable torch operations."""
    small = x <= 1.0
    xs = torch.where(small, x, torch.full_like(x, 0.5))
    e1 = torch.ones_like(x)
    r = torch.ones_like(x)
    active = torch.ones_like(x, dtype=torch.bool)
    for k_int in range(1, 26):
        k = float(k_int)
        d1 = k + 1.0
        new_r = -r * k * xs / (d1 * d1)
        r = torch.where(active, new_r, r)
        e1 = torch.where(active, e1 + r, e1)
        # converged elements stay frozen: all 25 steps run, without a device sync
        active = active & ~(r.abs() <= e1.abs() * 1e-15)
    # -0.5772156649015328: the value of Euler's constant featomic's exp1 uses
    value_small = -0.5772156649015328 - torch.log(xs) + xs * e1

    xl = torch.where(small, torch.full_like(x, 2.0), x)
    m = torch.floor(80.0 / xl) + 20.0
    t0 = torch.zeros_like(x)
    for k_int in range(100, 0, -1):
        k = float(k_int)
        new_t0 = k / (k / (xl + t0) + 1.0)
        t0 = torch.where(m >= k, new_t0, t0)
    t = 1.0 / (xl + t0)
    value_large = torch.exp(-xl) * t
    return torch.where(small, value_small, value_large)


def _horner(z: torch.Tensor, coefficients: List[float]) -> torch.Tensor:
    """featomic's ``evaluate_polynomial`` (coefficients from the lowest degree)."""
    n = len(coefficients)
    total = torch.full_like(z, coefficients[n - 1])
    for i in range(n - 2, -1, -1):
        total = coefficients[i] + z * total
    return total


def _featomic_erfc(
    z: torch.Tensor,
    numerators: List[List[float]],
    denominators: List[List[float]],
    intervals: List[List[float]],
) -> torch.Tensor:
    """featomic's ``erfc`` for ``z >= 0``, in differentiable torch operations.

    featomic's rational approximations (from statrs/Boost) with constants truncated to
    ten digits: accurate to ~1e-10 relative only, but reproducing them makes the
    densities of even exponents equal featomic's to the last digits. ``numerators`` and
    ``denominators`` are the tables of the 14 intervals (``A`` for ``z < 0.5`` first),
    ``intervals`` the ``[upper, offset, b]`` of the 13 others.
    """
    small = z < 0.5
    zs = torch.where(small, z, torch.full_like(z, 0.25))
    ratio = _horner(zs, numerators[0]) / _horner(zs, denominators[0])
    value_small = 1.0 - (zs * 1.125 + zs * ratio)
    # 0.003379167095512573896158903121545171688: featomic's slope below 1e-10
    value_tiny = 1.0 - (zs * 1.125 + zs * 0.003379167095512573896158903121545171688)
    value_small = torch.where(zs < 1e-10, value_tiny, value_small)

    result = torch.where(small, value_small, torch.zeros_like(z))
    lower = 0.5
    for i in range(len(intervals)):
        upper = intervals[i][0]
        offset = intervals[i][1]
        b = intervals[i][2]
        inside = (z >= lower) & (z < upper)
        # every interval is evaluated (no data-dependent branch, no device sync)
        zi = torch.where(inside, z, torch.full_like(z, 0.5 * (lower + upper)))
        shifted = zi - offset
        r = _horner(shifted, numerators[i + 1]) / _horner(shifted, denominators[i + 1])
        g = torch.exp(-zi * zi) / zi
        result = torch.where(inside, g * b + g * r, result)
        lower = upper
    return result


def _interval(positions: torch.Tensor, step: float, x: torch.Tensor) -> torch.Tensor:
    """Index ``k`` of the spline interval featomic uses for each ``x``.

    The largest ``k`` with ``positions[k] <= x`` (featomic's binary search), at most
    ``len(positions) - 2``. featomic's control points are a uniform grid of spacing
    ``step`` up to rounding, so ``floor(x / step)`` is within one of the answer and two
    rounds of comparisons with the control points make it exact (faster than
    ``torch.searchsorted`` on the CPU).
    """
    last = positions.shape[0] - 2
    x = x.detach()
    k = torch.clamp(torch.floor(x / step), 0.0, float(last)).to(torch.long)
    for _ in range(2):
        below = torch.index_select(positions, 0, k) > x
        k = torch.clamp(torch.where(below, k - 1, k), 0, last)
        above = torch.index_select(positions, 0, k + 1) <= x
        k = torch.clamp(torch.where(above, k + 1, k), 0, last)
    return k


def _hermite(
    positions: torch.Tensor,
    values: torch.Tensor,
    derivatives: torch.Tensor,
    step: float,
    x: torch.Tensor,
) -> torch.Tensor:
    """featomic's ``HermitCubicSpline::compute``, differentiable with respect to ``x``."""
    k = _interval(positions, step, x)
    k_1 = k + 1
    x_k = torch.index_select(positions, 0, k)
    x_k_1 = torch.index_select(positions, 0, k_1)
    delta = x_k_1 - x_k
    t = (x - x_k) / delta
    t_2 = t * t
    t_3 = t_2 * t
    h00 = (2.0 * t_3 - 3.0 * t_2 + 1.0).unsqueeze(1)
    h10 = (t_3 - 2.0 * t_2 + t).unsqueeze(1)
    h01 = (-2.0 * t_3 + 3.0 * t_2).unsqueeze(1)
    h11 = (t_3 - t_2).unsqueeze(1)
    delta = delta.unsqueeze(1)
    return (
        h00 * torch.index_select(values, 0, k)
        + h10 * delta * torch.index_select(derivatives, 0, k)
        + h01 * torch.index_select(values, 0, k_1)
        + h11 * delta * torch.index_select(derivatives, 0, k_1)
    )


def _rows_dot(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``vectors @ matrix.T`` with ndarray's ``unrolled_dot`` order of sums."""
    n = vectors.shape[1]
    zeros = torch.zeros(
        (vectors.shape[0], matrix.shape[0]), dtype=vectors.dtype, device=vectors.device
    )
    partial: List[torch.Tensor] = [zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros]
    start = 0
    while n - start >= 8:
        for i in range(8):
            partial[i] = partial[i] + vectors[:, start + i : start + i + 1] * matrix[:, start + i]
        start += 8
    total = zeros
    if start > 0:
        total = total + (partial[0] + partial[4])
        total = total + (partial[1] + partial[5])
        total = total + (partial[2] + partial[6])
        total = total + (partial[3] + partial[7])
    for i in range(start, n):
        total = total + vectors[:, i : i + 1] * matrix[:, i]
    return total


class LodeRadialIntegral(torch.nn.Module):
    """featomic's LODE radial integral ``I_nl(k)`` and density ``rho_hat(k)``.

    Parameters
    ----------
    max_angular : int
        Largest angular channel ``l``.
    max_radial : int
        Largest radial index ``n`` (``max_radial + 1`` GTOs).
    radius : float
        GTO radius; widths ``radius * max(sqrt(n), 1) / (max_radial + 1)``.
    smearing : float
        Gaussian smearing of the density.
    exponent : int
        Exponent ``p`` of the ``1/r^p`` potential, ``0 <= p < 10``.
    center_atom_weight : float
        Weight of the centre atom's own density.
    k_cutoff : float
        Reciprocal-space cutoff: the spline covers ``[0, k_cutoff]``.
    spline_accuracy : float or None
        Accuracy of featomic's spline, or ``None`` for the analytic form.
    featomic_erfc : bool
        For even exponents >= 2, evaluate ``erfc`` with featomic's own approximation
        (accurate to ~1e-10 relative, like featomic's results) rather than
        :func:`torch.special.erfc` (~1e-16): the densities then equal featomic's to the
        last digits instead of ~1e-10.

    Attributes
    ----------
    k0_term : torch.Tensor
        ``[max_radial + 1]`` float64, featomic's ``compute_k0_contributions()``
        (the k = 0 factor times ``I_n0(0)``); zeros unless ``exponent`` is 0 or > 3.
    center_term : torch.Tensor
        ``[max_radial + 1]`` float64, ``(1 - center_atom_weight)`` times featomic's
        centre-atom contribution (what it subtracts from the ``l = 0`` block of the
        centre's own type); zeros when ``center_atom_weight == 1``.
    """

    orthonormalization: torch.Tensor
    spline_positions: torch.Tensor
    spline_values: torch.Tensor
    spline_derivatives: torch.Tensor
    k0_term: torch.Tensor
    center_term: torch.Tensor
    n_points: List[int]
    widths: List[float]
    hyp_a: List[float]
    hyp_b: List[float]
    ratio: List[float]
    prefactor: List[float]
    hyp_constants: List[List[float]]
    spline_accuracy: Optional[float]
    erf_numerators: List[List[float]]
    erf_denominators: List[List[float]]
    erf_intervals: List[List[float]]

    def __init__(
        self,
        *,
        max_angular: int,
        max_radial: int,
        radius: float,
        smearing: float,
        exponent: int,
        center_atom_weight: float,
        k_cutoff: float,
        spline_accuracy: Optional[float],
        featomic_erfc: bool = True,
    ):
        super().__init__()
        max_angular = _as_int(max_angular, "max_angular")
        max_radial = _as_int(max_radial, "max_radial")
        exponent = _as_int(exponent, "exponent")
        radius = _as_float(radius, "radius")
        smearing = _as_float(smearing, "smearing")
        center_atom_weight = _as_float(center_atom_weight, "center_atom_weight")
        k_cutoff = _as_float(k_cutoff, "k_cutoff")
        if max_angular < 0:
            raise ValueError(f"'max_angular' must be non-negative, got {max_angular}")
        if max_radial < 0:
            raise ValueError(f"'max_radial' must be non-negative, got {max_radial}")
        if exponent < 0 or exponent >= 10:
            raise ValueError(
                f"'exponent' must be between 0 and 9 (LODE is only implemented for "
                f"potential exponents < 10), got {exponent}"
            )
        if not radius >= 1e-16:
            raise ValueError("'radius' of the GTO radial basis must be positive")
        if not math.isfinite(radius):
            raise ValueError("'radius' of the GTO radial basis can not be infinite/NaN")
        if not (smearing > 0.0 and math.isfinite(smearing)):
            raise ValueError(f"'smearing' must be positive and finite, got {smearing}")
        if not (k_cutoff > 0.0 and math.isfinite(k_cutoff)):
            raise ValueError(f"'k_cutoff' must be positive and finite, got {k_cutoff}")
        if spline_accuracy is not None:
            spline_accuracy = _as_float(spline_accuracy, "spline_accuracy")
            if spline_accuracy < 0.0:
                raise ValueError(
                    f"'spline_accuracy' must be positive, got {spline_accuracy}"
                )

        self.max_angular = max_angular
        self.max_radial = max_radial
        self.radius = radius
        self.smearing = smearing
        self.exponent = exponent
        self.center_atom_weight = center_atom_weight
        self.k_cutoff = k_cutoff
        self.use_spline = spline_accuracy is not None
        self.spline_accuracy = spline_accuracy

        size = max_radial + 1
        widths = gto_gaussian_widths(size, radius)
        orthonormalization = gto_orthonormalization(size, radius)
        self.widths = widths
        # the tables derived here are plain float64 attributes, not buffers: out of
        # state_dict (loading another calculator's checkpoint cannot change them) and
        # out of reach of casts (.float() of a scripted module included); they follow
        # the input's device at the next call (``_follow``)
        self.orthonormalization = torch.tensor(orthonormalization)

        # per (l, n) constants of the closed form, flattened l-major
        global_factor = math.sqrt(math.pi) / fm.SQRT_2
        self.hyp_a = []
        self.hyp_b = []
        self.ratio = []
        self.prefactor = []
        self.hyp_constants = []
        for l in range(max_angular + 1):
            for n in range(size):
                a = 0.5 * float(n + l + 3)
                b = float(l) + 1.5
                self.hyp_a.append(a)
                self.hyp_b.append(b)
                self.ratio.append(fm.gamma(a) / fm.gamma(b))
                self.hyp_constants.append(hyp1f1_constants(a, b))
                self.prefactor.append(
                    global_factor * fm.powi(widths[n], n + 3) * fm.powi(fm.SQRT_2, n)
                )

        # splines, padded to the longest one
        self.n_points = []
        splines: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if spline_accuracy is not None:
            for l in range(max_angular + 1):
                spline = spline_with_accuracy(
                    lambda x, l=l: _gto_integral(l, widths, orthonormalization, x),
                    0.0,
                    k_cutoff,
                    spline_accuracy,
                )
                splines.append(spline)
                self.n_points.append(int(spline[0].shape[0]))
        max_points = max(self.n_points) if self.n_points else 0
        positions = np.full((len(splines), max_points), math.inf)
        values = np.zeros((len(splines), max_points, size))
        derivatives = np.zeros((len(splines), max_points, size))
        for l, (p, v, d) in enumerate(splines):
            positions[l, : p.shape[0]] = p
            values[l, : p.shape[0]] = v
            derivatives[l, : p.shape[0]] = d
        self.spline_positions = torch.tensor(positions)
        self.spline_values = torch.tensor(values)
        self.spline_derivatives = torch.tensor(derivatives)

        # k = 0 term: featomic evaluates the l = 0 radial integral (its spline when
        # there is one, which reproduces the control point at 0 exactly) at k = 0
        if spline_accuracy is not None:
            at_zero = values[0, 0]
        else:
            at_zero = _gto_integral(0, widths, orthonormalization, np.zeros(1))[0][0]
        factor = k0_factor(exponent, smearing)
        k0 = factor * at_zero if (exponent == 0 or exponent > 3) else np.zeros(size)
        self.k0_term = torch.tensor(np.asarray(k0, dtype=np.float64))

        if center_atom_weight == 1.0:
            center = np.zeros(size)
        else:
            center = (1.0 - center_atom_weight) * center_contribution(
                widths, orthonormalization, smearing, exponent
            )
        self.center_term = torch.tensor(center)

        # constants of the density's Fourier transform
        p = float(exponent)
        smearing_squared = smearing * smearing
        if exponent == 0:
            self.density_factor = math.pow(4.0 * math.pi * smearing_squared, 0.75)
        elif exponent == 1:
            self.density_factor = 4.0 * math.pi
        else:
            p_eff = 3.0 - p
            self.density_factor = (
                math.pow(math.pi, 1.5)
                * math.pow(2.0 * smearing_squared, 0.5 * p_eff)
                / fm.gamma(0.5 * p)
            )
        self.smearing_squared = smearing_squared
        self.featomic_erfc = bool(featomic_erfc)
        letters = ["A"] + [interval[2] for interval in fm.ERF_INTERVALS]
        self.erf_numerators = [[float(c) for c in fm.ERF_TABLES[l + "N"]] for l in letters]
        self.erf_denominators = [[float(c) for c in fm.ERF_TABLES[l + "D"]] for l in letters]
        self.erf_intervals = [
            [float(upper), float(offset), float(b)]
            for upper, offset, _, b in fm.ERF_INTERVALS
        ]

    def extra_repr(self) -> str:
        spline = (
            f"spline_accuracy={self.spline_accuracy}, n_points={self.n_points}"
            if self.use_spline
            else "spline_accuracy=None"
        )
        return (
            f"max_angular={self.max_angular}, max_radial={self.max_radial}, "
            f"radius={self.radius}, smearing={self.smearing}, exponent={self.exponent}, "
            f"center_atom_weight={self.center_atom_weight}, k_cutoff={self.k_cutoff}, "
            f"{spline}"
        )

    def _follow(self, device: torch.device) -> None:
        """Move the tables to ``device`` (once, at the first call on a new device)."""
        if self.k0_term.device != device:
            self.orthonormalization = self.orthonormalization.to(device)
            self.spline_positions = self.spline_positions.to(device)
            self.spline_values = self.spline_values.to(device)
            self.spline_derivatives = self.spline_derivatives.to(device)
            self.k0_term = self.k0_term.to(device)
            self.center_term = self.center_term.to(device)

    def _analytic(self, k: torch.Tensor, l: int) -> torch.Tensor:
        size = self.max_radial + 1
        columns: List[torch.Tensor] = []
        for n in range(size):
            i = l * size + n
            sigma = self.widths[n]
            k_sigma_sqrt2 = k * sigma / fm.SQRT_2
            factor = self.prefactor[i] * _powi(k_sigma_sqrt2, l)
            k_sigma_2 = -k * sigma * sigma
            z = 0.5 * k * k_sigma_2
            value = self.ratio[i] * _hyp1f1(self.hyp_a[i], self.hyp_b[i], z, self.hyp_constants[i])
            columns.append(value * factor)
        values = torch.stack(columns, dim=1)
        return _rows_dot(self.orthonormalization.to(k.dtype), values)

    def forward(self, k: torch.Tensor) -> List[torch.Tensor]:
        """Radial integrals ``I_nl(k)`` for ``l = 0 .. max_angular``.

        Parameters
        ----------
        k : torch.Tensor
            ``[K]`` k-vector norms, ``0 <= k <= k_cutoff`` (featomic's spline does not
            extrapolate reliably beyond ``k_cutoff``).

        Returns
        -------
        list of torch.Tensor
            ``[K, max_radial + 1]`` per ``l``, in ``k``'s dtype and device,
            differentiable with respect to ``k``.
        """
        self._follow(k.device)
        dtype = k.dtype
        k64 = k.to(torch.float64)
        result: List[torch.Tensor] = []
        for l in range(self.max_angular + 1):
            if self.use_spline:
                n_points = self.n_points[l]
                values = _hermite(
                    self.spline_positions[l, :n_points].to(torch.float64),
                    self.spline_values[l, :n_points].to(torch.float64),
                    self.spline_derivatives[l, :n_points].to(torch.float64),
                    self.k_cutoff / float(n_points - 1),
                    k64,
                )
            else:
                values = self._analytic(k64, l)
            result.append(values.to(dtype))
        return result

    @torch.jit.export
    def density_fourier(self, k: torch.Tensor) -> torch.Tensor:
        """Fourier transform of the smeared power-law density (``compute_density_fourier``).

        Parameters
        ----------
        k : torch.Tensor
            ``[K]`` k-vector norms, ``k > 0``.

        Returns
        -------
        torch.Tensor
            ``[K]``, in ``k``'s dtype, differentiable with respect to ``k``.
        """
        dtype = k.dtype
        k = k.to(torch.float64)
        factor = self.density_factor
        s2 = self.smearing_squared
        p = self.exponent
        if p == 0:
            return (factor * torch.exp(-0.5 * k * k * s2)).to(dtype)
        k2 = k * k
        if p == 1:
            return (factor * (torch.exp(-0.5 * k2 * s2) / k2)).to(dtype)
        x = 0.5 * k2 * s2
        sqrt_pi = math.sqrt(math.pi)
        erfc_sqrt_x = torch.zeros_like(x)
        if p % 2 == 0:
            if self.featomic_erfc:
                erfc_sqrt_x = _featomic_erfc(
                    torch.sqrt(x), self.erf_numerators, self.erf_denominators, self.erf_intervals
                )
            else:
                erfc_sqrt_x = torch.special.erfc(torch.sqrt(x))
        if p == 2:
            value = torch.sqrt(math.pi / x) * erfc_sqrt_x
        elif p == 3:
            value = _exp1(x)
        elif p == 4:
            value = 2.0 * (
                torch.exp(-x) - torch.sqrt(math.pi * x) * erfc_sqrt_x
            )
        elif p == 5:
            value = torch.exp(-x) - x * _exp1(x)
        elif p == 6:
            value = (
                (2.0 - 4.0 * x) * torch.exp(-x)
                + 4.0 * sqrt_pi * torch.pow(x, 1.5) * erfc_sqrt_x
            ) / 3.0
        elif p == 7:
            value = (1.0 - x) * torch.exp(-x) / 2.0 + (x * x) / 2.0 * _exp1(x)
        elif p == 8:
            value = -2.0 / 15.0 * (
                (-3.0 + 2.0 * x - 4.0 * (x * x)) * torch.exp(-x)
                + 4.0 * sqrt_pi * torch.pow(x, 2.5) * erfc_sqrt_x
            )
        else:
            value = (x * x - x + 2.0) * torch.exp(-x) / 6.0 - (x * (x * x)) / 6.0 * _exp1(x)
        return (factor * value).to(dtype)
