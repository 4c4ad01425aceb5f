"""The conversion with the installed e3nn, through the public API only.

The default test command runs this file with e3nn 0.6; ``.ci/run`` runs it a second
time with e3nn 0.4.4, the version mace-torch pins (see the README's set-up). Every
test here uses only Irreps features that both versions have (``sort``, ``simplify``,
``slices``, ``D_from_matrix``).
"""

import pytest
import torch
from e3nn import o3
from metatensor.torch import TensorMap

from rascaline_e3nn import TensorMapToIrreps
from _systems import accurate_rotations, lode, rotate, spherical_expansion, water_sodium

TYPES = [1, 8, 11]

#: e3nn 0.4 scripts the code it generates for its layers when it builds them, and
#: recent torch (2.13 here) warns about one of its annotations; e3nn 0.6 does not
E3NN_04_SCRIPTS_ITS_LAYERS = pytest.mark.filterwarnings(
    "ignore:The TorchScript type system doesn't support instance-level annotations"
    ":UserWarning"
)


def rotate_irreps(x, irreps, R, layout):
    """``x`` transformed by the representation of R, in ``layout``."""
    out = torch.empty_like(x)
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        D = ir.D_from_matrix(R)
        if layout == "mul_ir":
            out[:, sl] = (x[:, sl].reshape(-1, mul, ir.dim) @ D.T).reshape(-1, mul * ir.dim)
        else:
            out[:, sl] = (D @ x[:, sl].reshape(-1, ir.dim, mul)).reshape(-1, ir.dim * mul)
    return out


@pytest.mark.parametrize("make_calculator", [lode, spherical_expansion])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_equivariant_on_featomic_output(float64_default, make_calculator, layout):
    calculator = make_calculator()
    module = TensorMapToIrreps.from_calculator(calculator, TYPES, layout=layout)
    irreps = module.irreps_out
    assert isinstance(irreps, o3.Irreps)
    assert irreps == irreps.sort().irreps.simplify()
    assert irreps.lmax == 4 and irreps.dim == sum(mul * ir.dim for mul, ir in irreps)

    system = water_sodium()
    x = module(calculator([system]))
    assert x.shape == (len(system), irreps.dim)
    for R in accurate_rotations(2):
        for Rm in (R, -R):  # -R is improper
            x_rotated = module(calculator([rotate(system, Rm)]))
            error = (x_rotated - rotate_irreps(x, irreps, Rm, layout)).abs().max()
            assert error <= 1e-12, f"det={torch.det(Rm):.0f}: error {error:.2e}"


@E3NN_04_SCRIPTS_ITS_LAYERS
def test_e3nn_linear_consumes_it_equivariantly(float64_default):
    calculator = lode(max_angular=3)
    to_irreps = TensorMapToIrreps.from_calculator(calculator, TYPES)
    irreps_out = o3.Irreps("2x0e + 1x1o + 1x2e")
    model = torch.nn.Sequential(calculator, to_irreps, o3.Linear(to_irreps.irreps_out, irreps_out))
    system = water_sodium()
    y = model([system])
    for R in accurate_rotations(1):
        for Rm in (R, -R):
            y_rotated = model([rotate(system, Rm)])
            expected = y @ irreps_out.D_from_matrix(Rm).T
            assert (y_rotated - expected).abs().max() <= 1e-12
    # the weights touch every l of the input: an equivariant map that is not zero
    assert y.abs().min() > 0


def test_inverse_gives_back_the_tensor_map():
    calculator = spherical_expansion(max_angular=3)
    tensor = calculator([water_sodium()])
    to_irreps = TensorMapToIrreps(tensor)
    back = to_irreps.inverse()(to_irreps(tensor), to_irreps.samples(tensor))
    assert back.keys == tensor.keys
    for key, block in tensor.items():
        restored = back.block(key)
        assert restored.components == block.components
        assert restored.properties == block.properties
        # rows are the union of the samples: featomic omits an atom without
        # neighbours of a type, which comes back as zeros
        present = restored.samples.select(block.samples)
        assert restored.samples.values[present].tolist() == block.samples.values.tolist()
        torch.testing.assert_close(restored.values[present], block.values, rtol=0, atol=1e-14)
        absent = torch.ones(len(restored.samples), dtype=torch.bool)
        absent[present] = False
        assert torch.all(restored.values[absent] == 0)


class _Pipeline(torch.nn.Module):
    """A scriptable model: our conversion, then an e3nn layer."""

    def __init__(self, to_irreps, linear):
        super().__init__()
        self.to_irreps = to_irreps
        self.linear = linear

    def forward(self, tensor: TensorMap) -> torch.Tensor:
        return self.linear(self.to_irreps(tensor))


@E3NN_04_SCRIPTS_ITS_LAYERS
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_scripted_with_an_e3nn_layer(tmp_path, layout):
    calculator = spherical_expansion(max_angular=3, max_radial=2)
    tensor = calculator([water_sodium()])
    to_irreps = TensorMapToIrreps.from_calculator(calculator, TYPES, layout=layout)
    linear = o3.Linear(to_irreps.irreps_out, "1x0e + 1x1o").to(torch.float64)
    eager = _Pipeline(to_irreps, linear)
    scripted = torch.jit.script(eager)
    torch.jit.save(scripted, str(tmp_path / "pipeline.pt"))
    loaded = torch.jit.load(str(tmp_path / "pipeline.pt"))

    expected = eager(tensor)
    assert expected.shape == (7, 4)
    assert torch.equal(scripted(tensor), expected)
    assert torch.equal(loaded(tensor), expected)
