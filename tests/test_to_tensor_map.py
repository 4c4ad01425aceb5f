"""IrrepsToTensorMap: exact inverse on real featomic output, generic irreps, and the
metatensor side checked with metatomic's own O(3) conventions."""

import pytest
import torch
from e3nn import o3
from featomic.torch.clebsch_gordan import EquivariantPowerSpectrum
from metatensor.torch import Labels

from rascaline_e3nn import IrrepsToTensorMap, TensorMapToIrreps
from _reference import reference_to_irreps, reference_to_tensor_map
from _systems import (
    DEVICES,
    accurate_rotations,
    lode,
    molecules,
    rotate,
    spherical_expansion,
    water_sodium,
)

OPTIONS = [(b, l) for b in ("e3nn", "featomic") for l in ("mul_ir", "ir_mul")]
ALL_TYPES = [1, 6, 8, 11, 17]


def lambda_soap(systems):
    calculator = EquivariantPowerSpectrum(
        spherical_expansion(max_angular=2, max_radial=1), dtype=torch.float64
    )
    return calculator.compute(systems, neighbors_to_properties=True)


@pytest.fixture(scope="module")
def tensors():
    se = spherical_expansion(max_angular=3)
    return {
        "lode": (lode()([water_sodium()]), None),
        "se-batch": (se(molecules()), se),
        "lambda-soap": (lambda_soap(molecules()), None),
        "lambda-soap-box": (lambda_soap([water_sodium()]), None),
    }


def assert_round_trip(T, back, basis):
    """Every block of T comes back with its metadata and values; entries the layout
    holds beyond T (samples, blocks) are zeros."""
    for key, block in T.items():
        out = back.block(key)
        assert out.components[0] == block.components[0]
        assert out.properties == block.properties
        assert out.values.dtype == block.values.dtype
        positions = [out.samples.position(s) for s in block.samples]
        assert None not in positions
        values = out.values[positions]
        if basis == "featomic":
            assert torch.equal(values, block.values)
        else:
            torch.testing.assert_close(values, block.values, rtol=0, atol=1e-13)
        others = [i for i in range(len(out.samples)) if i not in set(positions)]
        assert torch.all(out.values[others] == 0)
    for key, out in back.items():
        if key not in T.keys:
            assert torch.all(out.values == 0)


@pytest.mark.parametrize("name", ["lode", "se-batch", "lambda-soap", "lambda-soap-box"])
@pytest.mark.parametrize("basis, layout", OPTIONS)
def test_round_trip(tensors, name, basis, layout):
    T, calculator = tensors[name]
    if calculator is not None:  # a layout holding more than T: all types
        conv = TensorMapToIrreps.from_calculator(
            calculator, ALL_TYPES, basis=basis, layout=layout
        )
    else:
        conv = TensorMapToIrreps(T, basis=basis, layout=layout)
    inverse = conv.inverse()
    assert inverse.irreps_in == conv.irreps_out
    back = inverse(conv(T), conv.samples(T))
    assert back.keys.names == T.keys.names
    assert_round_trip(T, back, basis)
    # and the same through from_tensor_map
    if calculator is None:
        other = IrrepsToTensorMap.from_tensor_map(T, basis=basis, layout=layout)
        again = other(conv(T), conv.samples(T))
        for key, block in back.items():
            assert torch.equal(again.block(key).values, block.values)


@pytest.mark.parametrize("basis, layout", OPTIONS)
def test_inverse_matches_reference_on_arbitrary_tensors(tensors, basis, layout):
    T, _ = tensors["lambda-soap"]
    # each center type has only some of the neighbour-pair channels: random values
    # in the others are dropped knowingly (check=False); check=True refuses them
    conv = TensorMapToIrreps(T, basis=basis, layout=layout, check=False)
    samples = conv.samples(T)
    x = torch.randn(len(samples), conv.irreps_out.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="would be dropped"):
        TensorMapToIrreps(T, basis=basis, layout=layout).inverse()(x, samples)
    out = conv.inverse()(x, samples)
    rows = [tuple(r) for r in samples.values.tolist()]
    expected = reference_to_tensor_map(x, rows, T, basis=basis, layout=layout)
    for key, block in out.items():
        per_sample = expected[tuple(int(v) for v in key.values)]
        assert len(per_sample) == len(block.samples)
        for i, sample in enumerate(block.samples.values.tolist()):
            torch.testing.assert_close(
                block.values[i], per_sample[tuple(sample)], rtol=0,
                atol=0 if basis == "featomic" else 1e-13,
            )


def test_generic_l1_is_featomic_yzx_exactly():
    vectors = torch.randn(10, 3, dtype=torch.float64)
    # e3nn's l=1 harmonics are (x, y, z) (normalised); featomic's are (y, z, x)
    sh = o3.spherical_harmonics("1o", vectors, normalize=False)
    torch.testing.assert_close(sh, vectors * (3 / (4 * torch.pi)) ** 0.5, rtol=1e-15, atol=0)
    samples = Labels(["system", "atom"], torch.tensor([[0, i] for i in range(10)]))
    out = IrrepsToTensorMap("1x1o")(sh, samples)
    assert out.keys.values.tolist() == [[1, 1]]
    assert torch.equal(out.block(0).values[:, :, 0], sh[:, [1, 2, 0]])


def test_generic_matches_featomic_harmonics_of_real_vectors():
    """A spherical expansion of a dimer is proportional, for each (l, n), to
    featomic's harmonics Y_l(r) of the bond vector. e3nn's harmonics of the same vector,
    converted to a TensorMap, must be proportional to them, for every l."""
    max_l = 5
    calculator = spherical_expansion(max_angular=max_l, max_radial=0, cutoff=4.0)
    from metatomic.torch import System

    vectors = torch.randn(6, 3, dtype=torch.float64)
    vectors = 1.5 * vectors / vectors.norm(dim=1, keepdim=True)
    systems = [
        System(types=torch.tensor([1, 8]), positions=torch.stack([torch.zeros(3), v]),
               cell=torch.zeros(3, 3, dtype=torch.float64), pbc=torch.tensor([False] * 3))
        for v in vectors
    ]
    expansion = calculator(systems)
    irreps = o3.Irreps([(1, (l, (-1) ** l)) for l in range(max_l + 1)])
    sh = o3.spherical_harmonics(irreps, vectors, normalize=True)
    samples = Labels(["system", "atom"], torch.tensor([[i, 0] for i in range(6)]))
    out = IrrepsToTensorMap(irreps)(sh, samples)
    for l in range(max_l + 1):
        featomic = expansion.block(
            {"o3_lambda": l, "center_type": 1, "neighbor_type": 8}
        ).values[:, :, 0]
        ours = out.block({"o3_lambda": l}).values[:, :, 0]
        # proportional, with one constant for all vectors and components
        ratio = featomic.norm() / ours.norm()
        sign = torch.sign((featomic * ours).sum())
        torch.testing.assert_close(featomic, sign * ratio * ours, rtol=0, atol=1e-12)
        if l >= 2:  # the dense rotation matters: no permutation of m would do
            for perm in ([*range(2 * l + 1)], [*reversed(range(2 * l + 1))]):
                assert (sh[:, irreps.slices()[l]][:, perm] * ratio * sign - featomic).abs().max() > 1e-3


def test_generic_merges_repeated_irreps_in_order():
    irreps = o3.Irreps("1x0e + 2x1o + 2x0e + 1x1o + 1x0o")
    x = torch.arange(irreps.dim, dtype=torch.float64).reshape(1, -1)
    samples = Labels(["system", "atom"], torch.tensor([[0, 0]]))
    out = IrrepsToTensorMap(irreps, basis="featomic", property_name="channel")(x, samples)
    assert out.keys.values.tolist() == [[0, -1], [0, 1], [1, 1]]
    assert out.block({"o3_lambda": 0, "o3_sigma": 1}).values.flatten().tolist() == [0, 7, 8]
    assert out.block({"o3_lambda": 0, "o3_sigma": -1}).values.flatten().tolist() == [12]
    l1 = out.block({"o3_lambda": 1})
    assert l1.properties.names == ["channel"]
    assert l1.values[0].T.tolist() == [[1, 2, 3], [4, 5, 6], [9, 10, 11]]
    assert out.sample_names == ["system", "atom"]


@pytest.mark.parametrize("improper", [False, True])
def test_tensor_map_side_follows_metatomic_o3_conventions(float64_default, improper):
    """Rotating the e3nn tensor with e3nn's D(R) and converting must equal converting,
    then rotating the TensorMap with metatomic's own O(3) transformation."""
    from metatomic.torch.o3 import O3Transformations

    irreps = o3.Irreps("2x0e + 1x0o + 2x1o + 1x1e + 2x2e + 1x2o + 1x3o + 1x4e")
    module = IrrepsToTensorMap(irreps)
    x = torch.randn(5, irreps.dim)
    samples = Labels(["system", "atom"], torch.tensor([[0, i] for i in range(5)]))
    (R,) = accurate_rotations(1)
    if improper:
        R = -R
    transform = O3Transformations(R.unsqueeze(0), max_angular_momentum=4)
    expected = transform.transform_tensormap(module(x, samples))
    actual = module(x @ irreps.D_from_matrix(R).T, samples)
    for key, block in expected.items():
        torch.testing.assert_close(actual.block(key).values, block.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_lambda_soap_equivariant_both_directions(float64_default, layout):
    system = water_sodium()
    T = lambda_soap([system])
    conv = TensorMapToIrreps(T, layout=layout)
    inverse = conv.inverse()
    x = conv(T)
    irreps = conv.irreps_out
    for R in accurate_rotations(2):
        for Rm in (R, -R):
            T_rotated = lambda_soap([rotate(system, Rm)])
            D = irreps.D_from_matrix(Rm)
            if layout == "mul_ir":
                x_expected = x @ D.T
            else:
                x_expected = torch.cat([
                    (D[sl, sl][: ir.dim, : ir.dim] @ x[:, sl].reshape(-1, ir.dim, mul))
                    .reshape(-1, ir.dim * mul)
                    for (mul, ir), sl in zip(irreps, irreps.slices())
                ], dim=1)
            torch.testing.assert_close(conv(T_rotated), x_expected, rtol=0, atol=1e-12)
            back = inverse(x_expected, conv.samples(T))
            for key, block in T_rotated.items():
                torch.testing.assert_close(
                    back.block(key).values, block.values, rtol=0, atol=1e-12
                )


def test_gradients_flow_from_any_block_to_the_input(tensors):
    T, _ = tensors["lambda-soap"]
    conv = TensorMapToIrreps(T)
    inverse = conv.inverse()
    samples = conv.samples(T)
    x = conv(T).detach().requires_grad_()
    out = inverse(x, samples)
    reached = torch.zeros_like(x, dtype=torch.bool)
    for i in [0, len(out) // 2, len(out) - 1]:
        (grad,) = torch.autograd.grad(out.block_by_id(i).values.sum(), x, retain_graph=True)
        assert grad.abs().sum() > 0
        assert not (reached & (grad != 0)).any()  # blocks own disjoint entries
        reached |= grad != 0
    generic = IrrepsToTensorMap("2x0e + 1x1o + 1x2e")
    y = torch.randn(3, generic.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    s = Labels(["system", "atom"], torch.tensor([[0, 0], [0, 1], [1, 0]]))

    def function(y):
        return tuple(b.values for b in generic(y, s).blocks())

    assert torch.autograd.gradcheck(function, (y,))
    assert torch.autograd.gradgradcheck(function, (y,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_follow_the_input(tensors, dtype, device):
    T, _ = tensors["lode"]
    conv = TensorMapToIrreps(T)
    inverse = conv.inverse().to(device)
    x = conv(T).to(dtype=dtype, device=device)
    out = inverse(x, conv.samples(T).to(device))
    assert out.device.type == device and out.block(0).values.dtype == dtype
    assert out.keys.device.type == device
    assert out.block(0).samples.device.type == device
    out = out.to("cpu")
    expected = conv.inverse()(conv(T), conv.samples(T))
    for key, block in expected.items():
        torch.testing.assert_close(
            out.block(key).values.cpu(), block.values.to(dtype), rtol=0,
            atol=1e-6 if dtype == torch.float32 else 1e-15,
        )


def test_reference_consistency(tensors):
    """The two slow references agree with each other (guards the oracle itself)."""
    T, _ = tensors["se-batch"]
    x, rows, _ = reference_to_irreps(T, T, basis="e3nn", layout="ir_mul")
    back = reference_to_tensor_map(x, rows, T, basis="e3nn", layout="ir_mul")
    for key, block in T.items():
        per_sample = back[tuple(int(v) for v in key.values)]
        for i, sample in enumerate(block.samples.values.tolist()):
            torch.testing.assert_close(
                per_sample[tuple(sample)], block.values[i], rtol=0, atol=1e-14
            )
