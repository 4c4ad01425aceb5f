"""What the modules hold and how it follows ``.to()``, ``.float()`` and ``check``."""

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from _reference import reference_to_irreps
from _systems import molecules, spherical_expansion
from rascaline_e3nn import IrrepsToTensorMap, TensorMapToIrreps
from rascaline_e3nn import _conventions


def block(l, samples, n_properties=2, dtype=torch.float64):
    samples = torch.tensor(samples, dtype=torch.int32)
    return TensorBlock(
        values=torch.randn(len(samples), 2 * l + 1, n_properties, dtype=torch.float64).to(dtype),
        samples=Labels(["system", "atom"], samples),
        components=[Labels(["o3_mu"], torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1))],
        properties=Labels(["n"], torch.arange(n_properties, dtype=torch.int32).reshape(-1, 1)),
    )


def tensor_map(keys, blocks):
    names = ["o3_lambda", "o3_sigma", "center_type", "neighbor_type"]
    return TensorMap(Labels(names, torch.tensor(keys, dtype=torch.int32)), blocks)


def with_holes():
    """Center H has neighbours H and O, center O only O: the O rows have no H-neighbour
    channels (holes)."""
    keys = [[l, 1, c, n] for l in (0, 2) for c, n in ((1, 1), (1, 8), (8, 8))]
    samples = {1: [[0, 1], [0, 2]], 8: [[0, 0]]}
    return tensor_map(keys, [block(k[0], samples[k[2]]) for k in keys])


def test_nan_in_a_hole_is_refused():
    tensor = with_holes()
    conv = TensorMapToIrreps(tensor)
    x = conv(tensor)
    samples = conv.samples(tensor)
    holes = (conv._read._columns == torch.tensor(conv._read._group_width).unsqueeze(1))
    oxygen = samples.values[:, 2].tolist().index(8)
    column = int(torch.nonzero(holes[1])[0, 0])
    for value in (float("nan"), 1.0, float("inf")):
        y = x.clone()
        y[oxygen, column] = value
        with pytest.raises(ValueError, match="would be dropped"):
            conv.inverse()(y, samples)
    # zeros there are fine; check=False drops them knowingly
    conv.inverse()(x, samples)
    y = x.clone()
    y[oxygen, column] = float("nan")
    unchecked = TensorMapToIrreps(tensor, check=False).inverse()
    back = unchecked(y, samples)
    assert not any(torch.isnan(b.values).any() for b in back.blocks())


def test_integers_are_refused_in_the_e3nn_basis_with_or_without_checks():
    keys = [[l, 1, 1, 1] for l in (0, 2)]
    tensor = tensor_map(keys, [block(l, [[0, 0]], dtype=torch.int64) for l in (0, 2)])
    for check in (True, False):
        conv = TensorMapToIrreps(tensor, check=check)
        with pytest.raises(ValueError, match="floating point"):
            conv(tensor)
        x = TensorMapToIrreps(tensor, basis="featomic", check=check)(tensor)
        assert x.dtype == torch.int64
        with pytest.raises(ValueError, match="floating point"):
            conv.inverse()(x, conv.samples(tensor))


def test_float_keeps_the_change_of_basis_in_float64():
    tensor = with_holes()
    expected = TensorMapToIrreps(tensor)(tensor)
    conv = TensorMapToIrreps(tensor).float()
    assert conv._basis.dtype == torch.float64
    assert torch.equal(conv(tensor), expected)
    inverse = TensorMapToIrreps(tensor).inverse().half()
    samples = conv.samples(tensor)
    back = inverse(expected, samples)
    reference = TensorMapToIrreps(tensor).inverse()(expected, samples)
    for a, b in zip(back.blocks(), reference.blocks()):
        assert torch.equal(a.values, b.values)


def test_the_change_of_basis_leaves_the_default_dtype_alone(monkeypatch):
    def refuse(dtype):
        raise AssertionError("the global default dtype was changed")

    _conventions._change_of_basis.cache_clear()
    monkeypatch.setattr(torch, "set_default_dtype", refuse)
    try:
        for l in range(6):
            D = _conventions.change_of_basis(l)
            assert torch.allclose(D @ D.T, torch.eye(2 * l + 1, dtype=D.dtype), atol=1e-14)
    finally:
        _conventions._change_of_basis.cache_clear()


def test_the_change_of_basis_is_e3nns_own(float64_default):
    from e3nn import o3

    Q = torch.tensor(_conventions.BASIS_CHANGE_MATRIX, dtype=torch.float64)
    for l in range(8):
        expected = o3.Irrep(l, 1).D_from_matrix(Q)
        torch.testing.assert_close(_conventions.change_of_basis(l), expected, rtol=0, atol=1e-13)


def test_no_empty_irreps():
    keys = [[0, 1, 1, 1], [1, 1, 1, 1], [2, 1, 1, 1]]
    tensor = tensor_map(keys, [block(0, [[0, 0]]), block(1, [[0, 0]], 0), block(2, [[0, 0]])])
    conv = TensorMapToIrreps(tensor)
    assert str(conv.irreps_out) == "2x0e+2x2e"
    assert all(mul > 0 for mul, _ in conv.irreps_out)
    x = conv(tensor)
    back = conv.inverse()(x, conv.samples(tensor))
    assert back.block({"o3_lambda": 1}).values.shape == (1, 3, 0)
    assert str(IrrepsToTensorMap("2x0e+0x1o+1x2e").irreps_in) == "2x0e+1x2e"


@pytest.mark.parametrize("basis", ["e3nn", "featomic"])
def test_unchecked_equals_checked_equals_reference(basis):
    """featomic's blocks of one center type hold different samples here (C-H only
    methane's carbon, C-O only CO's): check=False takes the same path."""
    calculator = spherical_expansion()
    tensor = calculator(molecules())
    template = tensor
    checked = TensorMapToIrreps(template, basis=basis)
    unchecked = TensorMapToIrreps(template, basis=basis, check=False)
    expected, rows, _ = reference_to_irreps(tensor, template, basis=basis)
    for module in (checked, unchecked, torch.jit.script(unchecked)):
        x = module(tensor)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-14)
        assert [tuple(r) for r in module.samples(tensor).values.tolist()] == rows


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_unchecked_keys_other_than_the_templates(scripted):
    """check=False and as many keys as the template: keys in the template's order are
    taken as they are (one host read); in another order they are matched by value,
    and a key the template does not have is a ValueError naming it, never an index
    out of range (a device-side assert on CUDA)."""
    tensor = with_holes()
    # swap two blocks of the same shape (l = 0, center H, neighbours H and O)
    order = [1, 0, 2, 3, 4, 5]
    blocks = [tensor.block_by_id(i).copy() for i in order]
    reordered = TensorMap(Labels(tensor.keys.names, tensor.keys.values[order]), blocks)
    expected = TensorMapToIrreps(tensor)(tensor)
    unchecked = TensorMapToIrreps(tensor, check=False)
    if scripted:
        unchecked = torch.jit.script(unchecked)
    assert torch.equal(TensorMapToIrreps(tensor)(reordered), expected)
    assert torch.equal(unchecked(tensor), expected)
    assert torch.equal(unchecked(reordered), expected)
    # the same number of keys, one of them another type's
    values = tensor.keys.values.clone()
    values[3, 3] = 6  # (l=2, center H, neighbour O) -> neighbour C
    foreign = TensorMap(Labels(tensor.keys.names, values), [b.copy() for b in tensor.blocks()])
    message = r"block \(o3_lambda=2, o3_sigma=1, center_type=1, neighbor_type=6\) is not in the layout"
    with pytest.raises((ValueError, torch.jit.Error), match=message):
        unchecked(foreign)
