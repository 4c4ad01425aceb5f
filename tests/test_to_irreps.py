"""TensorMapToIrreps on real featomic output, against the slow reference."""

import pytest
import torch
from e3nn import o3
from metatensor.torch import Labels, TensorBlock, TensorMap

from rascaline_e3nn import TensorMapToIrreps
from rascaline_e3nn._calculator import template_from_calculator
from _reference import reference_to_irreps, with_grad
from _systems import DEVICES, accurate_rotations, lode, molecules, rotate, spherical_expansion, water_sodium

ALL_TYPES = [1, 6, 8, 11, 17]
OPTIONS = [(b, l) for b in ("e3nn", "featomic") for l in ("mul_ir", "ir_mul")]


def shuffled(tensor: TensorMap) -> TensorMap:
    order = torch.randperm(len(tensor.keys))
    keys = Labels(tensor.keys.names, tensor.keys.values[order])
    return TensorMap(keys, [tensor.block_by_id(int(i)).copy() for i in order])


@pytest.fixture(scope="module")
def lode_water():
    calculator = lode(max_angular=4)
    return calculator, calculator([water_sodium()])


@pytest.fixture(scope="module")
def se_molecules():
    calculator = spherical_expansion(max_angular=3)
    return calculator, calculator(molecules())


def assert_matches_reference(module, tensor, template, basis, layout, **kwargs):
    expected, rows, irreps = reference_to_irreps(
        tensor, template, basis=basis, layout=layout, **kwargs
    )
    assert str(module.irreps_out) == irreps
    actual = module(tensor)
    assert actual.dtype == tensor.block(0).values.dtype
    tolerance = 0.0 if basis == "featomic" else 1e-14
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=tolerance)
    assert module.samples(tensor).values.tolist() == [list(r) for r in rows]


@pytest.mark.parametrize("basis, layout", OPTIONS)
def test_lode_single_system_matches_reference(lode_water, basis, layout):
    _, tensor = lode_water
    module = TensorMapToIrreps(tensor, basis=basis, layout=layout)
    assert_matches_reference(module, tensor, tensor, basis, layout)


@pytest.mark.parametrize("basis, layout", OPTIONS)
def test_batch_with_missing_types_and_samples_matches_reference(se_molecules, basis, layout):
    calculator, tensor = se_molecules
    # the batch lacks many (center, neighbor) pairs; blocks of one center type have
    # different samples (e.g. C-H holds only methane's carbon, C-O only CO's)
    module = TensorMapToIrreps.from_calculator(
        calculator, ALL_TYPES, basis=basis, layout=layout
    )
    assert len(module.plan.blocks) == 5 * 5 * 4 > len(tensor.keys)
    template = template_from_calculator(calculator, ALL_TYPES)
    assert_matches_reference(module, tensor, template, basis, layout)
    assert_matches_reference(module, shuffled(tensor), template, basis, layout)


def test_samples_are_the_lexicographic_union(se_molecules):
    calculator, tensor = se_molecules
    module = TensorMapToIrreps.from_calculator(calculator, ALL_TYPES)
    samples = module.samples(tensor)
    assert samples.names == ["system", "atom", "center_type"]
    rows = samples.values.tolist()
    assert rows == sorted(rows)
    # every atom of the batch is a row, with its own type
    systems = molecules()
    expected = [
        [s, a, int(system.types[a])]
        for s, system in enumerate(systems)
        for a in range(len(system))
    ]
    assert rows == expected


def test_from_calculator_equals_template_layout():
    calculator = lode(max_angular=3)
    tensor = calculator([water_sodium()])  # every pair of H, O, Na occurs
    from_template = TensorMapToIrreps(tensor)
    from_calc = TensorMapToIrreps.from_calculator(calculator, [11, 1, 8])
    assert from_calc.irreps_out == from_template.irreps_out
    assert from_calc.plan.channels == from_template.plan.channels
    assert torch.equal(from_calc(tensor), from_template(tensor))


def test_from_calculator_pairs_equals_the_real_outputs_layout():
    """SphericalExpansionByPair: keys (o3_lambda, o3_sigma, first_atom_type,
    second_atom_type), samples (system, first_atom, second_atom, cell_shift_a/b/c),
    as featomic gives them; atom types given as a generator (read once)."""
    from test_rows import pairs

    calculator = pairs()
    tensor = calculator([water_sodium()])  # every pair of H, O, Na occurs
    from_calc = TensorMapToIrreps.from_calculator(calculator, (t for t in [11, 1, 8]))
    from_template = TensorMapToIrreps(tensor)
    assert from_calc.keys() == tensor.keys
    assert from_calc.plan.sample_names == tensor.sample_names
    assert from_calc.plan.row_key_names == ["first_atom_type", "second_atom_type"]
    assert from_calc.irreps_out == from_template.irreps_out
    assert from_calc.plan.channels == from_template.plan.channels
    assert torch.equal(from_calc(tensor), from_template(tensor))
    assert from_calc.samples(tensor) == from_template.samples(tensor)
    for key, block in tensor.items():
        planned = from_calc.plan.blocks[from_calc.keys().position(key)]
        assert torch.equal(planned.properties, block.properties.values)


def test_from_calculator_explicit_basis():
    import featomic.torch as ft

    calculator = ft.SphericalExpansion(
        cutoff={"radius": 3.5, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        density={"type": "Gaussian", "width": 0.3},
        basis={
            "type": "Explicit",
            "by_angular": {
                "0": {"type": "Gto", "max_radial": 4},
                "2": {"type": "Gto", "max_radial": 1},
            },
        },
    )
    tensor = calculator([water_sodium()])
    module = TensorMapToIrreps.from_calculator(calculator, [1, 8, 11])
    assert module.irreps_out == o3.Irreps("15x0e + 6x2e")
    assert torch.equal(module(tensor), TensorMapToIrreps(tensor)(tensor))


def test_irreps_in_e3nn_order_and_parity():
    from featomic.torch.clebsch_gordan import EquivariantPowerSpectrum

    calculator = EquivariantPowerSpectrum(
        spherical_expansion(max_angular=2, max_radial=1), dtype=torch.float64
    )
    tensor = calculator.compute([water_sodium()], neighbors_to_properties=True)
    module = TensorMapToIrreps(tensor)
    irreps = module.irreps_out
    assert irreps == irreps.sort().irreps.simplify()
    # pseudo-tensors (o3_sigma = -1) have the opposite parity
    assert [str(ir) for _, ir in irreps] == [
        "0e", "1o", "1e", "2o", "2e", "3o", "3e", "4e",
    ]


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_l0_and_l1_are_bit_exact_permutations(lode_water, layout):
    _, tensor = lode_water
    e3nn = TensorMapToIrreps(tensor, basis="e3nn", layout=layout)(tensor)
    featomic = TensorMapToIrreps(tensor, basis="featomic", layout=layout)(tensor)
    irreps = TensorMapToIrreps(tensor).irreps_out
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        if ir.l == 0:
            assert torch.equal(e3nn[:, sl], featomic[:, sl])
        if ir.l == 1:
            a = e3nn[:, sl].reshape(-1, mul, 3) if layout == "mul_ir" else \
                e3nn[:, sl].reshape(-1, 3, mul).transpose(1, 2)
            b = featomic[:, sl].reshape(-1, mul, 3) if layout == "mul_ir" else \
                featomic[:, sl].reshape(-1, 3, mul).transpose(1, 2)
            # featomic's (y, z, x) -> e3nn's (x, y, z)
            assert torch.equal(a, b[:, :, [2, 0, 1]])


@pytest.mark.parametrize("make_calculator", [lode, spherical_expansion])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_equivariance_proper_and_improper(float64_default, make_calculator, layout):
    calculator = make_calculator()
    system = water_sodium()
    module = TensorMapToIrreps.from_calculator(
        calculator, [1, 8, 11], layout=layout
    )
    x = module(calculator([system]))
    irreps = module.irreps_out
    for R in accurate_rotations(3):
        for Rm in (R, -R):  # -R is improper
            x_rotated = module(calculator([rotate(system, Rm)]))
            D = irreps.D_from_matrix(Rm)
            if layout == "ir_mul":
                expected = _ir_mul_rotate(x, irreps, D)
            else:
                expected = x @ D.T
            error = (x_rotated - expected).abs().max()
            assert error <= 1e-12, f"det={torch.det(Rm):.0f}, error {error:.2e}"


def _ir_mul_rotate(x, irreps, D):
    """Rotate an ir_mul tensor: each segment [2l+1, mul] gets D_l on its first axis."""
    out = torch.empty_like(x)
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        d = D[sl, sl][: ir.dim, : ir.dim]
        out[:, sl] = (d @ x[:, sl].reshape(-1, ir.dim, mul)).reshape(-1, ir.dim * mul)
    return out


def test_featomic_basis_is_not_e3nn_equivariant_for_l_ge_2(float64_default):
    calculator = spherical_expansion()
    system = water_sodium()
    module = TensorMapToIrreps.from_calculator(calculator, [1, 8, 11], basis="featomic")
    x = module(calculator([system]))
    (R,) = accurate_rotations(1)
    x_rotated = module(calculator([rotate(system, R)]))
    expected = x @ module.irreps_out.D_from_matrix(R).T
    for (mul, ir), sl in zip(module.irreps_out, module.irreps_out.slices()):
        error = (x_rotated[:, sl] - expected[:, sl]).abs().max()
        scale = x[:, sl].abs().max()
        if ir.l == 0:
            assert error <= 1e-12
        else:
            # the error is of the order of the features themselves
            assert error > 0.05 * scale, f"{ir}: {error:.2e} vs {scale:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_follow_the_input(lode_water, dtype, device):
    _, tensor = lode_water
    module = TensorMapToIrreps(tensor).to(device)
    moved = tensor.to(dtype=dtype, device=device)
    x = module(moved)
    assert x.dtype == dtype and x.device.type == device
    reference = TensorMapToIrreps(tensor)(tensor).to(dtype)
    # the device's matmul may round the l >= 2 change of basis differently: ~1e-16
    torch.testing.assert_close(x.cpu(), reference, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-15)


def test_row_keys_are_configurable(lode_water):
    _, tensor = lode_water
    no_rows = TensorMapToIrreps(tensor, row_keys=[], basis="featomic")
    expected, rows, irreps = reference_to_irreps(tensor, tensor, basis="featomic", row_keys=[])
    assert torch.equal(no_rows(tensor), expected)
    assert no_rows.samples(tensor).names == ["system", "atom"]
    # both key dimensions moved to rows: one row per (atom, neighbor type)
    both = TensorMapToIrreps(tensor, row_keys=["center_type", "neighbor_type"])
    expected, rows, irreps = reference_to_irreps(
        tensor, tensor, row_keys=["center_type", "neighbor_type"]
    )
    torch.testing.assert_close(both(tensor), expected, rtol=0, atol=1e-14)
    assert both.samples(tensor).names == ["system", "atom", "center_type", "neighbor_type"]
    assert len(rows) == 7 * 3


def test_gradcheck_through_block_values():
    calculator = spherical_expansion(max_angular=2, max_radial=1)
    tensor = calculator(molecules()[:2])
    module = TensorMapToIrreps(tensor)
    leaves = [b.values.detach().clone().requires_grad_() for b in tensor.blocks()]

    def function(*values):
        blocks = [
            TensorBlock(values=v, samples=b.samples, components=b.components,
                    properties=b.properties)
            for v, b in zip(values, tensor.blocks())
        ]
        return module(TensorMap(tensor.keys, blocks))

    assert torch.autograd.gradcheck(function, leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(function, leaves, fast_mode=True)


# featomic's LODE does not provide gradients with respect to the cell
@pytest.mark.parametrize(
    "make_calculator, cell_grad", [(lode, False), (spherical_expansion, True)]
)
def test_gradcheck_positions_and_cell(make_calculator, cell_grad):
    calculator = make_calculator(max_angular=2, max_radial=1)
    system = water_sodium()
    module = TensorMapToIrreps.from_calculator(calculator, [1, 8, 11])
    from metatomic.torch import System

    def function(positions, cell):
        s = System(types=system.types, positions=positions, cell=cell, pbc=system.pbc)
        return module(calculator([s]))

    positions = system.positions.detach().clone().requires_grad_()
    cell = system.cell.detach().clone().requires_grad_(cell_grad)
    assert torch.autograd.gradcheck(function, (positions, cell), fast_mode=True)


# featomic-torch warns that it does not give second derivatives with respect to
# positions; the force loss only needs the mixed (positions, weights) ones
@pytest.mark.filterwarnings("ignore:second derivatives with respect to positions")
def test_eager_sequential_with_force_loss_trains_weights():
    """calculator -> TensorMapToIrreps -> e3nn Linear, energies and forces, and a
    force loss backpropagated to the weights (checked by finite differences)."""
    from metatomic.torch import System

    calculator = spherical_expansion(max_angular=2, max_radial=1)
    to_irreps = TensorMapToIrreps.from_calculator(calculator, [1, 8, 11])
    linear = o3.Linear(to_irreps.irreps_out, "1x0e").to(torch.float64)
    model = torch.nn.Sequential(calculator, to_irreps, linear)
    base = water_sodium()

    def force_loss():
        positions = base.positions.detach().clone().requires_grad_()
        system = System(types=base.types, positions=positions, cell=base.cell, pbc=base.pbc)
        energy = model([system]).sum()
        (forces,) = torch.autograd.grad(-energy, positions, create_graph=True)
        return (forces**2).sum()

    loss = force_loss()
    loss.backward()
    grad = linear.weight.grad.clone()
    assert grad.abs().max() > 0
    index = int(grad.abs().argmax())
    eps = 1e-6
    linear.weight.data[index] += eps
    plus = force_loss().item()
    linear.weight.data[index] -= 2 * eps
    minus = force_loss().item()
    linear.weight.data[index] += eps
    torch.testing.assert_close(
        grad[index], torch.tensor((plus - minus) / (2 * eps), dtype=grad.dtype),
        rtol=1e-5, atol=1e-9,
    )


@pytest.mark.parametrize("basis, layout", OPTIONS)
def test_fast_path_and_generic_path_agree_exactly(lode_water, basis, layout):
    """Within one system, the blocks of a center type share their samples (the fast
    path). Listing one block's samples in another order sends the conversion down the
    generic path (union of samples, every block expanded to it): same output, bit for
    bit, with and without gradients."""
    _, tensor = lode_water
    module = TensorMapToIrreps(tensor, basis=basis, layout=layout)
    blocks = []
    for i, block in enumerate(tensor.blocks()):
        if i == 5:  # a block of the first center type, samples reversed
            order = torch.arange(len(block.samples) - 1, -1, -1)
            block = TensorBlock(
                values=block.values[order],
                samples=Labels(block.samples.names, block.samples.values[order]),
                components=block.components,
                properties=block.properties,
            )
        blocks.append(block.copy())
    reordered = TensorMap(tensor.keys, blocks)
    assert not torch.equal(reordered.block(5).samples.values, tensor.block(5).samples.values)
    assert torch.equal(module(reordered), module(tensor))
    assert module.samples(reordered) == module.samples(tensor)

    grads = []
    for t in (tensor, reordered):
        inputs, leaves = with_grad(t)
        out = module(inputs)
        assert torch.equal(out.detach(), module(tensor))
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape))
        grads.append([v.grad for v in leaves])
    order = torch.arange(len(tensor.block(5).samples) - 1, -1, -1)
    grads[1][5] = grads[1][5][order]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
