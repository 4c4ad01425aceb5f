"""Rows: pair expansions by default, and rows in the caller's order."""

import featomic.torch as ft
import pytest
import torch
from metatensor.torch import Labels

from _reference import reference_to_irreps
from _systems import accurate_rotations, rotate, water_sodium
from rascaline_e3nn import TensorMapToIrreps

PAIR_ROW_KEYS = ["first_atom_type", "second_atom_type"]


def pairs(cutoff=3.5):
    return ft.SphericalExpansionByPair(
        cutoff={"radius": cutoff, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        density={"type": "Gaussian", "width": 0.3},
        basis={"type": "TensorProduct", "max_angular": 3,
               "radial": {"type": "Gto", "max_radial": 2}},
    )


@pytest.fixture(scope="module")
def pair_tensor():
    # a 6 Å box and a 3.5 Å cutoff: pairs across periodic images, and i -> j with
    # j -> i
    return pairs()([water_sodium()])


def test_pairs_move_both_atom_types_to_rows_by_default(pair_tensor):
    module = TensorMapToIrreps(pair_tensor)
    assert module.plan.row_key_names == PAIR_ROW_KEYS
    # one channel per radial function, not one per radial function and type pair
    assert str(module.irreps_out) == "3x0e+3x1o+3x2e+3x3o"
    samples = module.samples(pair_tensor)
    assert samples.names == pair_tensor.sample_names + PAIR_ROW_KEYS
    rows = {tuple(r) for r in samples.values.tolist()}
    shifted = [r for r in rows if any(r[3:6])]
    assert shifted, "no pair across a periodic image"
    for r in shifted:  # j -> i of the opposite shift is there too
        assert (r[0], r[2], r[1], -r[3], -r[4], -r[5], r[7], r[6]) in rows
    for basis in ("e3nn", "featomic"):
        for layout in ("mul_ir", "ir_mul"):
            module = TensorMapToIrreps(pair_tensor, basis=basis, layout=layout)
            expected, expected_rows, irreps = reference_to_irreps(
                pair_tensor, pair_tensor, basis=basis, layout=layout, row_keys=PAIR_ROW_KEYS
            )
            x = module(pair_tensor)
            assert [tuple(r) for r in module.samples(pair_tensor).values.tolist()] == expected_rows
            torch.testing.assert_close(x, expected, rtol=0, atol=1e-14)
            back = module.inverse()(x, module.samples(pair_tensor))
            assert_same_blocks(back, pair_tensor, atol=1e-14)


def assert_same_blocks(back, tensor, atol):
    """Every block of ``tensor`` is in ``back``, sample by sample (``back`` may hold
    more samples, with zeros)."""
    for key, block in tensor.items():
        got = back.block(key)
        index = [got.samples.position(s) for s in block.samples.values.tolist()]
        torch.testing.assert_close(got.values[index], block.values, rtol=0, atol=atol)


def test_pair_features_are_equivariant(float64_default, pair_tensor):
    """Rotate the structure: every pair's features rotate with e3nn's D(R), for proper
    and improper R. A right-handed cell after an improper R flips the first cell
    vector, so the pair (i, j, a, b, c) becomes (i, j, -a, b, c): the rotated batch is
    read in the original's rows through ``rows``."""
    module = TensorMapToIrreps(pair_tensor)
    samples = module.samples(pair_tensor)
    x = module(pair_tensor)
    for R in accurate_rotations(2):
        for sign in (1.0, -1.0):
            Rs = sign * R
            system = rotate(water_sodium(), Rs)
            rotated = pairs()([system])
            rows = samples.values.clone()
            if torch.det(water_sodium().cell @ Rs.T) < 0:
                rows[:, 3] = -rows[:, 3]
            y = module(rotated, Labels(samples.names, rows))
            D = module.irreps_out.D_from_matrix(Rs)
            torch.testing.assert_close(y, x @ D.T, rtol=0, atol=1e-12)


def test_rows_in_the_callers_order(pair_tensor):
    module = TensorMapToIrreps(pair_tensor)
    samples = module.samples(pair_tensor)
    x = module(pair_tensor)
    n = len(samples)
    permutation = torch.randperm(n)
    # the rows with their row-key columns, shuffled, plus two the tensor lacks
    extra = torch.tensor([[0, 0, 0, 9, 9, 9, 8, 8], [0, 5, 6, 0, 0, 1, 1, 1]], dtype=torch.int32)
    values = torch.cat([samples.values[permutation], extra])
    wanted = Labels(samples.names, values)
    y = module(pair_tensor, wanted)
    assert y.shape == (n + 2, module.irreps_out.dim)
    assert torch.equal(y[:n], x[permutation])
    assert torch.equal(y[n:], torch.zeros_like(y[n:]))
    # without the row-key columns: matched on the samples alone
    sample_names = pair_tensor.sample_names
    plain = Labels(sample_names, samples.values[permutation][:, : len(sample_names)])
    assert torch.equal(module(pair_tensor, plain), x[permutation])
    # scripted: the same
    scripted = torch.jit.script(module)
    assert torch.equal(scripted(pair_tensor, wanted), y)
    # the inverse takes the same rows as samples (zeros where the tensor had none)
    back = module.inverse()(y, wanted)
    assert_same_blocks(back, pair_tensor, atol=1e-14)


def test_rows_missing_an_entry_of_the_tensor_is_an_error(pair_tensor):
    module = TensorMapToIrreps(pair_tensor)
    samples = module.samples(pair_tensor)
    fewer = Labels(samples.names, samples.values[1:])
    first = ", ".join(f"{n}={v}" for n, v in zip(samples.names, samples.values[0].tolist()))
    with pytest.raises(ValueError, match=r"\(" + first + r"\).*not in `rows`"):
        module(pair_tensor, fewer)
    with pytest.raises(ValueError, match="lack the sample dimension"):
        module(pair_tensor, Labels(["system"], torch.tensor([[0]], dtype=torch.int32)))


def test_rows_for_atom_centred_features_select_atoms():
    """An atom selection: the rows of the atoms asked for, in that order; an atom of
    the tensor left out is an error, since its values would be dropped."""
    calculator = ft.LodeSphericalExpansion(
        density={"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
        basis={"type": "TensorProduct", "max_angular": 2,
               "radial": {"type": "Gto", "max_radial": 1, "radius": 3.0}},
    )
    tensor = calculator([water_sodium()])
    module = TensorMapToIrreps(tensor)
    x = module(tensor)
    samples = module.samples(tensor)
    order = [6, 0, 3, 1, 2, 4, 5]
    wanted = Labels(["system", "atom"], torch.tensor([[0, a] for a in order], dtype=torch.int32))
    y = module(tensor, wanted)
    atoms = samples.values[:, 1].tolist()
    assert torch.equal(y, x[[atoms.index(a) for a in order]])


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_rows_with_some_of_the_row_key_columns_name_the_missing_one(scripted):
    """Rows are (system, atom, center_type, neighbor_type); `rows` with the center
    type but not the neighbour type cannot tell the neighbour types apart: an error
    naming the missing column, never rows silently dropped."""
    from _systems import spherical_expansion

    tensor = spherical_expansion(max_angular=1, max_radial=1)([water_sodium()])
    module = TensorMapToIrreps(tensor, row_keys=["center_type", "neighbor_type"])
    if scripted:
        module = torch.jit.script(module)
    samples = module.samples(tensor)
    x = module(tensor)
    assert torch.equal(module(tensor, samples), x)
    names = ["system", "atom", "center_type"]
    partial = torch.unique(samples.values[:, :3], dim=0)
    missing = r"lack the row-key column.*\['?neighbor_type'?\]"
    with pytest.raises((ValueError, torch.jit.Error), match=missing):
        module(tensor, Labels(names, partial))
    # without any row-key column: the same
    plain = torch.unique(samples.values[:, :2], dim=0)
    both = r"lack the row-key column.*center_type'?, '?neighbor_type"
    with pytest.raises((ValueError, torch.jit.Error), match=both):
        module(tensor, Labels(["system", "atom"], plain))


def vesin_edges(system, cutoff):
    """A GNN's edge list: vesin's full neighbour list (i -> j and j -> i, no
    self-pairs), as `rows` Labels of featomic's pair samples."""
    import numpy as np
    import vesin

    i, j, S = vesin.NeighborList(cutoff=cutoff, full_list=True).compute(
        points=system.positions.numpy(), box=system.cell.numpy(), periodic=True,
        quantities="ijS",
    )
    values = np.concatenate([np.zeros((len(i), 1)), i[:, None], j[:, None], S], axis=1)
    names = ["system", "first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"]
    return Labels(names, torch.tensor(values, dtype=torch.int32))


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_a_gnn_edge_list_takes_exactly_its_edges(scripted, pair_tensor):
    """featomic's pairs include one self-pair (i, i, 0, 0, 0) per atom (l = 0 blocks
    only), vesin's edges none: unlisted_rows='drop' takes exactly the edges, in
    their order; the default refuses to drop the self-pairs silently."""
    edges = vesin_edges(water_sodium(), cutoff=3.5)
    strict = TensorMapToIrreps(pair_tensor)
    module = TensorMapToIrreps(pair_tensor, unlisted_rows="drop")
    if scripted:
        strict, module = torch.jit.script(strict), torch.jit.script(module)
    x = strict(pair_tensor)
    samples = strict.samples(pair_tensor)
    sample_rows = [tuple(r[:6]) for r in samples.values.tolist()]
    self_pairs = [r for r in sample_rows if r[1] == r[2] and not any(r[3:])]
    assert len(self_pairs) == len(water_sodium().types)
    y = module(pair_tensor, edges)
    assert y.shape == (len(edges), x.shape[1])
    for e, edge in enumerate(edges.values.tolist()):
        # every edge is one of featomic's pairs (same cutoff), self-pairs aside
        assert torch.equal(y[e], x[sample_rows.index(tuple(edge))])
    assert len(edges) == len(sample_rows) - len(self_pairs)
    with pytest.raises((ValueError, torch.jit.Error), match=r"not in `rows`.*unlisted_rows='drop'"):
        strict(pair_tensor, edges)


def test_an_atom_selection():
    tensor = ft.LodeSphericalExpansion(
        density={"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
        basis={"type": "TensorProduct", "max_angular": 2,
               "radial": {"type": "Gto", "max_radial": 1, "radius": 3.0}},
    )([water_sodium()])
    module = TensorMapToIrreps(tensor, unlisted_rows="drop")
    x = module(tensor)
    atoms = module.samples(tensor).values[:, 1].tolist()
    wanted = Labels(["system", "atom"], torch.tensor([[0, 4], [0, 1]], dtype=torch.int32))
    assert torch.equal(module(tensor, wanted), x[[atoms.index(4), atoms.index(1)]])
    with pytest.raises(ValueError, match="not in `rows`"):
        TensorMapToIrreps(tensor)(tensor, wanted)
    with pytest.raises(ValueError, match="unlisted_rows must be one of"):
        TensorMapToIrreps(tensor, unlisted_rows="ignore")
