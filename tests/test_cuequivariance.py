"""``layout="ir_mul"`` feeds cuequivariance (``cuequivariance-torch``, here on the CPU).

What holds (checked below): cuequivariance's ``O3`` irreps have e3nn's basis (same
generators, same inversion signs), so ``cue.Irreps("O3", str(irreps_out))`` describes
our output exactly, segment for segment; our ``ir_mul`` output is cuequivariance's
own transposition of our ``mul_ir`` output; and a cuequivariance layer consuming it
is equivariant under proper and improper rotations. Only the sort order differs:
cuequivariance sorts ``0e`` before ``0o``, e3nn ``0o`` before ``0e``, so do not
``sort()`` the ``cue.Irreps``: take them in our (e3nn) order.
"""

import pathlib
import re

import pytest
import torch
from e3nn import o3

from rascaline_e3nn import TensorMapToIrreps
from _systems import accurate_rotations, lode, rotate, spherical_expansion, water_sodium

cue = pytest.importorskip("cuequivariance")
cuet = pytest.importorskip("cuequivariance_torch")

TYPES = [1, 8, 11]


@pytest.fixture(scope="module")
def lambda_soap():
    """λ-SOAP of a real structure: tensors and pseudo-tensors (0e, 1o, 1e, 2o, ...)."""
    from featomic.torch.clebsch_gordan import EquivariantPowerSpectrum

    calculator = EquivariantPowerSpectrum(
        spherical_expansion(max_angular=2, max_radial=1), dtype=torch.float64
    )
    return calculator.compute([water_sodium()], neighbors_to_properties=True)


def rotate_ir_mul(x, irreps, R):
    """``x`` in ir_mul layout transformed by R: each ``[2l+1, mul]`` segment gets
    e3nn's ``D_l(R)`` on its first axis."""
    out = torch.empty_like(x)
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        D = ir.D_from_matrix(R)
        out[:, sl] = (D @ x[:, sl].reshape(-1, ir.dim, mul)).reshape(-1, ir.dim * mul)
    return out


@pytest.mark.parametrize("basis", ["e3nn", "featomic"])
def test_ir_mul_is_cuequivariance_transpose_of_mul_ir(lambda_soap, basis):
    mul_ir = TensorMapToIrreps(lambda_soap, basis=basis, layout="mul_ir")
    ir_mul = TensorMapToIrreps(lambda_soap, basis=basis, layout="ir_mul")
    irreps = cue.Irreps("O3", str(mul_ir.irreps_out))
    transpose = cuet.TransposeIrrepsLayout(irreps, source=cue.mul_ir, target=cue.ir_mul)
    x = mul_ir(lambda_soap)
    assert any(mul > 1 and ir.l > 0 for mul, ir in mul_ir.irreps_out)  # not a no-op
    assert torch.equal(ir_mul(lambda_soap), transpose(x))
    # and back
    back = cuet.TransposeIrrepsLayout(irreps, source=cue.ir_mul, target=cue.mul_ir)
    assert torch.equal(back(ir_mul(lambda_soap)), x)


def test_cuequivariance_o3_is_e3nn_o3(float64_default, lambda_soap):
    irreps = TensorMapToIrreps(lambda_soap).irreps_out
    assert {ir.p for _, ir in irreps} == {-1, 1}
    cue_irreps = cue.Irreps("O3", str(irreps))
    # same segments, in the same order
    assert [(m, ir.l, ir.p) for m, ir in cue_irreps] == [(m, ir.l, ir.p) for m, ir in irreps]
    assert cue_irreps.dim == irreps.dim

    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    axis = axis / axis.norm()
    angle = torch.tensor(1.1, dtype=torch.float64)
    for _, ir in irreps:
        cue_ir = cue.O3(ir.l, ir.p)
        # rotations: the same matrices (same generators, hence the same basis)
        cue_D = torch.from_numpy(cue_ir.rotation(axis.numpy(), float(angle)))
        e3nn_D = ir.D_from_axis_angle(axis, angle)
        torch.testing.assert_close(cue_D, e3nn_D, rtol=0, atol=1e-12)
        # inversion: the parity p
        (H,) = cue_ir.discrete_generators()
        assert torch.equal(torch.from_numpy(H), ir.p * torch.eye(ir.dim, dtype=torch.float64))

    # the one difference: the sort order of the parities
    assert str(cue.Irreps("O3", "1x0o + 1x0e").sort().irreps) == "0e+0o"
    assert str(o3.Irreps("1x0o + 1x0e").sort().irreps) == "1x0o+1x0e"


@pytest.mark.parametrize("make_calculator", [lode, spherical_expansion])
def test_cuequivariance_linear_is_equivariant_on_ir_mul(float64_default, make_calculator):
    calculator = make_calculator()
    to_irreps = TensorMapToIrreps.from_calculator(calculator, TYPES, layout="ir_mul")
    irreps_out = o3.Irreps("2x0e + 1x1o + 1x2e")
    linear = cuet.Linear(
        cue.Irreps("O3", str(to_irreps.irreps_out)),
        cue.Irreps("O3", str(irreps_out)),
        layout=cue.ir_mul,
        dtype=torch.float64,
        method="naive",  # the PyTorch path, on the CPU
    )
    with torch.no_grad():
        linear.weight.normal_()

    system = water_sodium()
    x = to_irreps(calculator([system]))
    y = linear(x)
    assert y.shape == (len(system), irreps_out.dim) and y.dtype == torch.float64
    assert y.abs().max() > 1e-3
    for R in accurate_rotations(2):
        for Rm in (R, -R):  # -R is improper
            x_rotated = to_irreps(calculator([rotate(system, Rm)]))
            error_x = (x_rotated - rotate_ir_mul(x, to_irreps.irreps_out, Rm)).abs().max()
            error_y = (linear(x_rotated) - rotate_ir_mul(y, irreps_out, Rm)).abs().max()
            assert error_x <= 1e-12, f"det={torch.det(Rm):.0f}: input error {error_x:.2e}"
            assert error_y <= 1e-12, f"det={torch.det(Rm):.0f}: output error {error_y:.2e}"


def test_cuequivariance_tensor_product_is_equivariant_on_ir_mul(float64_default):
    calculator = spherical_expansion(max_angular=2, max_radial=1)
    to_irreps = TensorMapToIrreps.from_calculator(calculator, TYPES, layout="ir_mul")
    irreps_in = cue.Irreps("O3", str(to_irreps.irreps_out))
    irreps_out = o3.Irreps("1x0e + 1x1o + 1x1e + 1x2e")
    product = cuet.FullyConnectedTensorProduct(
        irreps_in, irreps_in, cue.Irreps("O3", str(irreps_out)),
        layout=cue.ir_mul, dtype=torch.float64, method="naive",
    )
    with torch.no_grad():
        product.weight.normal_()

    system = water_sodium()
    x = to_irreps(calculator([system]))
    y = product(x, x)
    # x (x) x has a pseudo-vector part (1e), which only a correct parity keeps equivariant
    assert y.abs().max() > 1e-3
    for R in accurate_rotations(1):
        for Rm in (R, -R):
            x_rotated = to_irreps(calculator([rotate(system, Rm)]))
            error = (product(x_rotated, x_rotated) - rotate_ir_mul(y, irreps_out, Rm)).abs().max()
            assert error <= 1e-12, f"det={torch.det(Rm):.0f}: error {error:.2e}"


def test_readme_cuequivariance_example_runs():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Which layout for which library"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    calculator = lode(max_angular=2, max_radial=1)
    namespace = {"calculator": calculator, "systems": [water_sodium()],
                 "TensorMapToIrreps": TensorMapToIrreps, "torch": torch}
    exec(compile(code, "README.md", "exec"), namespace)
    y = namespace["y"]
    assert y.shape == (7, 4) and y.dtype == torch.float64
