"""Malformed inputs: every one fails loudly with a ValueError naming the culprit.

Checks made in ``forward`` (or the exported ``samples``) are run eagerly and on the
scripted module, where TorchScript re-raises the ValueError as a ``torch.jit.Error``
whose message ends with ``builtins.ValueError: <the original message>``.
"""

import re

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from _reference import reference_to_irreps
from _systems import DEVICES
from rascaline_e3nn import IrrepsToTensorMap, TensorMapToIrreps

KEY_NAMES = ["o3_lambda", "o3_sigma", "center_type", "neighbor_type"]
SAMPLE_NAMES = ["system", "atom"]
#: samples of each center type
SAMPLES = {1: [[0, 1], [0, 2], [1, 0]], 8: [[0, 0]]}
ROW_NAMES = SAMPLE_NAMES + ["center_type"]

scripted = pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])


# ---------------------------------------------------------------------- builders


def o3_mu(values):
    return Labels(["o3_mu"], torch.tensor(values, dtype=torch.int32).reshape(-1, 1))


def spherical_block(
    l,
    samples,
    properties=((0,), (1,)),
    property_names=("n",),
    dtype=torch.float64,
    components=None,
    sample_names=SAMPLE_NAMES,
):
    samples = torch.tensor(samples, dtype=torch.int32).reshape(len(samples), -1)
    properties = torch.tensor(properties, dtype=torch.int32).reshape(
        len(properties), len(property_names)
    )
    if components is None:
        components = [o3_mu(list(range(-l, l + 1)))]
    shape = [len(samples)] + [len(c) for c in components] + [len(properties)]
    if dtype.is_floating_point:
        values = torch.randn(shape, dtype=torch.float64).to(dtype)
    else:
        values = torch.randint(-5, 5, shape, dtype=dtype)
    return TensorBlock(
        values=values,
        samples=Labels(list(sample_names), samples),
        components=components,
        properties=Labels(list(property_names), properties),
    )


def tensor_map(keys, blocks, names=KEY_NAMES, assume_unique=False):
    values = torch.tensor(keys, dtype=torch.int32).reshape(len(keys), len(names))
    if assume_unique:
        return TensorMap(Labels(list(names), values, assume_unique=True), blocks)
    return TensorMap(Labels(list(names), values), blocks)


def with_every_center(keys, blocks, dtype=torch.float64):
    """Add a valid block for every center type ``keys`` lack, so that the input has
    rows for all of them and nothing but the culprit differs from a valid input."""
    for center in (1, 8):
        if all(k[2] != center for k in keys):
            keys = keys + [[0, 1, center, 8]]
            blocks = blocks + [spherical_block(0, SAMPLES[center], dtype=dtype)]
    return tensor_map(keys, blocks, assume_unique=True)


TEMPLATE_KEYS = [
    [l, 1, center, neighbor] for l in (0, 1, 2) for center in (1, 8) for neighbor in (1, 8)
]


def template(**block_options):
    """Three irreps (0e, 1o, 2e), centers H and O, neighbours H and O."""
    blocks = [spherical_block(k[0], SAMPLES[k[2]], **block_options) for k in TEMPLATE_KEYS]
    return tensor_map(TEMPLATE_KEYS, blocks)


def valid_input(**block_options):
    return template(**block_options)


def assert_fails(function, args, match, scripted=False):
    """``function(*args)`` raises a ValueError whose message matches ``match``."""
    if scripted:
        with pytest.raises((torch.jit.Error, RuntimeError)) as info:
            function(*args)
        text = str(info.value)
        assert "ValueError: " in text, f"not a ValueError:\n{text}"
        # the message proper, after TorchScript's excerpt of the source
        text = text.rsplit("ValueError: ", 1)[1]
    else:
        with pytest.raises(ValueError) as info:
            function(*args)
        text = str(info.value)
    assert re.search(match, text), f"{match!r} not found in the message {text!r}"


def to_irreps(scripted, tensor=None, **options):
    module = TensorMapToIrreps(template() if tensor is None else tensor, **options)
    return torch.jit.script(module) if scripted else module


def inverse(scripted, **options):
    module = TensorMapToIrreps(template(), **options).inverse()
    return torch.jit.script(module) if scripted else module


def from_irreps(scripted, irreps, **options):
    module = IrrepsToTensorMap(irreps, **options)
    return torch.jit.script(module) if scripted else module


def q(name):
    """``name`` quoted as Python prints it, or bare as TorchScript does."""
    return "'?" + re.escape(name) + "'?"


DUPLICATE = r"(?i)(duplicat|twice|more than once|multiple times|repeated)"


# ---------------------------------------------------------------------- valid inputs


@scripted
def test_valid_inputs_pass(scripted):
    """The control of every test below: the unmodified inputs convert."""
    conv = to_irreps(scripted)
    x = conv(valid_input())
    samples = conv.samples(valid_input())
    assert x.shape == (4, 2 * (1 + 3 + 5) * 2)
    back = inverse(scripted)(x, samples)
    assert len(back) == len(TEMPLATE_KEYS)


# ---------------------------------------------------------------------- TensorMapToIrreps.forward


@scripted
def test_unknown_key(scripted):
    conv = to_irreps(scripted)
    for key, culprit in [
        ([3, 1, 1, 1], r"o3_lambda=3, o3_sigma=1, center_type=1, neighbor_type=1"),
        ([1, -1, 1, 1], r"o3_lambda=1, o3_sigma=-1"),
        ([0, 1, 6, 1], r"center_type=6"),
        ([0, 1, 1, 6], r"neighbor_type=6"),
    ]:
        tensor = tensor_map([key], [spherical_block(key[0], SAMPLES[1])])
        match = culprit + r".*not in the layout"
        assert_fails(conv, (tensor,), match, scripted)
        assert_fails(conv.samples, (tensor,), match, scripted)


@scripted
def test_key_dimensions_differ(scripted):
    conv = to_irreps(scripted)
    missing = tensor_map([[0, 1, 1]], [spherical_block(0, SAMPLES[1])], names=KEY_NAMES[:3])
    assert_fails(conv, (missing,), r"dimensions.*neighbor_type", scripted)
    extra = tensor_map(
        [[0, 1, 1, 1, 0]], [spherical_block(0, SAMPLES[1])], names=KEY_NAMES + ["spin"]
    )
    assert_fails(conv, (extra,), r"dimensions.*spin", scripted)
    no_sigma = tensor_map(
        [[0, 1, 1, 1]], [spherical_block(0, SAMPLES[1])],
        names=["o3_lambda", "parity", "center_type", "neighbor_type"],
    )
    assert_fails(conv, (no_sigma,), r"dimensions.*parity", scripted)


@scripted
def test_o3_mu_missing(scripted):
    conv = to_irreps(scripted)
    tensor = tensor_map([[1, 1, 1, 1]], [spherical_block(1, SAMPLES[1], components=[])])
    assert_fails(conv, (tensor,), r"components \[\]", scripted)


@scripted
def test_o3_mu_wrong_name(scripted):
    conv = to_irreps(scripted)
    mu = Labels(["m"], torch.tensor([[-1], [0], [1]], dtype=torch.int32))
    tensor = tensor_map([[1, 1, 1, 1]], [spherical_block(1, SAMPLES[1], components=[mu])])
    assert_fails(conv, (tensor,), r"components \[" + q("m") + r"\]", scripted)


@scripted
def test_o3_mu_misordered(scripted):
    conv = to_irreps(scripted)
    for l, mu in [(1, [1, 0, -1]), (2, [-2, -1, 1, 0, 2]), (1, [0, 1, 2])]:
        block = spherical_block(l, SAMPLES[1], components=[o3_mu(mu)])
        tensor = tensor_map([[l, 1, 1, 1]], [block])
        expected = re.escape(str(mu))
        assert_fails(conv, (tensor,), rf"o3_lambda={l}.*o3_mu components {expected}", scripted)


@scripted
def test_o3_mu_wrong_size(scripted):
    conv = to_irreps(scripted)
    for l, mu in [(1, [-2, -1, 0, 1, 2]), (2, [-1, 0, 1]), (0, [-1, 0, 1])]:
        block = spherical_block(l, SAMPLES[1], components=[o3_mu(mu)])
        tensor = tensor_map([[l, 1, 1, 1]], [block])
        expected = re.escape(str(mu))
        assert_fails(conv, (tensor,), rf"o3_lambda={l}.*o3_mu components {expected}", scripted)


@scripted
def test_property_not_in_template(scripted):
    conv = to_irreps(scripted)
    block = spherical_block(2, SAMPLES[8], properties=[[1], [7]])
    tensor = tensor_map([[2, 1, 8, 1]], [block])
    assert_fails(
        conv, (tensor,),
        r"o3_lambda=2.*center_type=8.*property \(n=7\).*not in the template",
        scripted,
    )


@scripted
def test_property_dimensions_differ(scripted):
    conv = to_irreps(scripted)
    block = spherical_block(0, SAMPLES[1], properties=[[0, 0]], property_names=("n", "k"))
    tensor = tensor_map([[0, 1, 1, 1]], [block])
    assert_fails(
        conv, (tensor,),
        r"properties \[" + q("n") + ", " + q("k") + r"\]",
        scripted,
    )


@scripted
def test_property_names_differ(scripted):
    """Same number of property dimensions and values, other names: the values would
    land in the wrong channels."""
    conv = to_irreps(scripted)
    block = spherical_block(0, SAMPLES[1], properties=[[0], [1]], property_names=("k",))
    others = spherical_block(0, SAMPLES[8], properties=[[0], [1]], property_names=("k",))
    tensor = tensor_map([[0, 1, 1, 1], [0, 1, 8, 8]], [block, others])
    assert_fails(conv, (tensor,), r"properties \[" + q("k") + r"\]", scripted)


@scripted
def test_property_names_swapped(scripted):
    props = [[0, 0], [0, 1], [1, 0]]
    conv = to_irreps(scripted, template(properties=props, property_names=("n", "k")))
    block = spherical_block(1, SAMPLES[1], properties=[[1, 0]], property_names=("k", "n"))
    others = spherical_block(1, SAMPLES[8], properties=[[0, 0]], property_names=("k", "n"))
    tensor = tensor_map([[1, 1, 1, 1], [1, 1, 8, 8]], [block, others])
    assert_fails(conv, (tensor,), r"properties \[" + q("k") + ", " + q("n") + r"\]", scripted)


@scripted
def test_sample_names_differ(scripted):
    conv = to_irreps(scripted)
    for names in (["system", "atom", "extra"], ["atom", "system"], ["structure", "atom"]):
        samples = [list(range(len(names)))]
        block = spherical_block(0, samples, sample_names=names)
        tensor = tensor_map([[0, 1, 1, 1]], [block])
        quoted = ", ".join(q(n) for n in names)
        assert_fails(conv, (tensor,), r"samples \[" + quoted + r"\]", scripted)


@scripted
def test_gradients(scripted):
    conv = to_irreps(scripted)
    block = spherical_block(1, SAMPLES[1])
    gradient = TensorBlock(
        values=torch.zeros(1, 3, 3, 2, dtype=torch.float64),
        samples=Labels(["sample", "system", "atom"], torch.tensor([[0, 0, 1]], dtype=torch.int32)),
        components=[
            Labels(["xyz"], torch.arange(3, dtype=torch.int32).reshape(-1, 1)),
            o3_mu([-1, 0, 1]),
        ],
        properties=block.properties,
    )
    block.add_gradient("positions", gradient)
    tensor = tensor_map([[1, 1, 1, 1]], [block])
    assert_fails(conv, (tensor,), r"gradients.*featomic-torch's autograd", scripted)


@scripted
def test_duplicated_keys(scripted):
    """Labels(..., assume_unique=True) lets a TensorMap hold one key twice: one of the
    two blocks would silently overwrite the other."""
    conv = to_irreps(scripted)
    blocks = [spherical_block(0, [[0, 1]]), spherical_block(0, [[0, 2]])]
    tensor = with_every_center([[0, 1, 1, 1], [0, 1, 1, 1]], blocks)
    assert_fails(conv, (tensor,), DUPLICATE, scripted)
    assert_fails(
        conv, (tensor,),
        r"o3_lambda=0, o3_sigma=1, center_type=1, neighbor_type=1",
        scripted,
    )


@scripted
@pytest.mark.parametrize("shared", [True, False], ids=["shared-samples", "own-samples"])
def test_duplicated_samples_in_a_block(scripted, shared):
    """Labels(..., assume_unique=True) samples: one value would be silently dropped
    (or two rows would have the same metadata)."""
    conv = to_irreps(scripted)
    duplicated = Labels(
        SAMPLE_NAMES, torch.tensor([[0, 1], [0, 1]], dtype=torch.int32), assume_unique=True
    )
    first = spherical_block(0, [[0, 1], [0, 2]])
    first = TensorBlock(first.values, duplicated, first.components, first.properties)
    blocks = [first, first.copy() if shared else spherical_block(0, [[0, 2]])]
    tensor = with_every_center([[0, 1, 1, 1], [0, 1, 1, 8]], blocks)
    assert_fails(conv, (tensor,), DUPLICATE, scripted)


@scripted
@pytest.mark.parametrize("where", ["single-class-group", "split-class"])
def test_duplicated_samples_beside_a_group_with_other_samples(scripted, where):
    """One row group's blocks hold different samples (the union path), another
    group's block repeats a sample: refused whichever group it is in (the output
    Labels are built with assume_unique=True)."""
    conv = to_irreps(scripted)
    duplicated = Labels(
        SAMPLE_NAMES, torch.tensor([[0, 0], [0, 0]], dtype=torch.int32), assume_unique=True
    )
    oxygen = spherical_block(0, [[0, 0], [0, 3]])
    oxygen = TensorBlock(oxygen.values, duplicated, oxygen.components, oxygen.properties)
    if where == "single-class-group":
        # H: blocks of two lengths; O: one block, with a repeated sample
        keys = [[0, 1, 1, 1], [0, 1, 1, 8], [0, 1, 8, 8]]
        blocks = [spherical_block(0, SAMPLES[1]), spherical_block(0, [[0, 1]]), oxygen]
    else:
        # O: two blocks of one length, other samples; the second repeats one
        keys = [[0, 1, 8, 1], [0, 1, 8, 8], [0, 1, 1, 1]]
        blocks = [spherical_block(0, [[0, 0], [0, 5]]), oxygen, spherical_block(0, SAMPLES[1])]
    tensor = tensor_map(keys, blocks, assume_unique=True)
    assert_fails(conv, (tensor,), DUPLICATE, scripted)


@scripted
def test_integer_values_in_e3nn_basis(scripted):
    """Integers cannot hold the dense l = 2 change of basis: it would be truncated."""
    conv = to_irreps(scripted, basis="e3nn")
    block = spherical_block(2, SAMPLES[1], dtype=torch.int64)
    tensor = with_every_center([[2, 1, 1, 1]], [block], dtype=torch.int64)
    assert_fails(conv, (tensor,), r"torch\.int64 values.*floating point", scripted)


# ---------------------------------------------------------------------- IrrepsToTensorMap.forward


DIM = 2 * (1 + 3 + 5) * 2  # TEMPLATE_KEYS' layout


def rows(values, names=ROW_NAMES, assume_unique=False):
    values = torch.tensor(values, dtype=torch.int32).reshape(len(values), len(names))
    return Labels(list(names), values, assume_unique=assume_unique)


@scripted
def test_wrong_width(scripted):
    module = inverse(scripted)
    samples = rows([[0, 1, 1], [0, 0, 8]])
    assert_fails(
        module, (torch.zeros(2, DIM + 1), samples),
        rf"\[n_rows, {DIM}\].*got.*\[2, {DIM + 1}\]",
        scripted,
    )
    assert_fails(
        module, (torch.zeros(2, DIM - 3), samples),
        rf"\[n_rows, {DIM}\].*got.*\[2, {DIM - 3}\]",
        scripted,
    )
    assert_fails(
        module, (torch.zeros(DIM), samples),
        rf"\[n_rows, {DIM}\].*got.*\[{DIM}\]",
        scripted,
    )
    module = from_irreps(scripted, "2x0e+1x1o")
    samples = Labels(["system"], torch.tensor([[0], [1]], dtype=torch.int32))
    assert_fails(module, (torch.zeros(2, 6), samples), r"\[n_rows, 5\].*got.*\[2, 6\]", scripted)


@scripted
def test_samples_wrong_length(scripted):
    module = inverse(scripted)
    samples = rows([[0, 1, 1], [0, 0, 8], [0, 2, 1]])
    assert_fails(
        module, (torch.zeros(2, DIM), samples),
        r"samples have 3 entries for 2 rows",
        scripted,
    )
    module = from_irreps(scripted, "1x0e")
    samples = Labels(["system"], torch.tensor([[0]], dtype=torch.int32))
    assert_fails(
        module, (torch.zeros(2, 1), samples),
        r"samples have 1 entries for 2 rows",
        scripted,
    )


@scripted
def test_samples_lack_row_key(scripted):
    module = inverse(scripted)
    samples = rows([[0, 1], [0, 0]], names=SAMPLE_NAMES)
    assert_fails(
        module, (torch.zeros(2, DIM), samples),
        r"lack the dimension " + q("center_type"),
        scripted,
    )


@scripted
def test_samples_lack_sample_dimension(scripted):
    module = inverse(scripted)
    samples = rows([[0, 1], [0, 8]], names=["system", "center_type"])
    assert_fails(
        module, (torch.zeros(2, DIM), samples),
        r"lack the dimension " + q("atom"),
        scripted,
    )


@scripted
def test_row_key_not_in_layout(scripted):
    module = inverse(scripted)
    samples = rows([[0, 1, 1], [0, 0, 6]])
    assert_fails(
        module, (torch.zeros(2, DIM), samples),
        r"center_type=6.*not in the layout",
        scripted,
    )


@scripted
def test_duplicated_samples_inverse(scripted):
    # given with duplicates (Labels(..., assume_unique=True))
    module = from_irreps(scripted, "1x0e+1x1o")
    samples = rows([[0, 1], [0, 1]], names=SAMPLE_NAMES, assume_unique=True)
    assert_fails(module, (torch.zeros(2, 4), samples), DUPLICATE, scripted)
    module = inverse(scripted)
    samples = rows([[0, 1, 1], [0, 1, 1]], assume_unique=True)
    assert_fails(module, (torch.zeros(2, DIM), samples), DUPLICATE, scripted)



@scripted
def test_inverse_refuses_sample_columns_that_forward_rows_refuse(scripted):
    """The inverse of TensorMapToIrreps takes the columns its samples() gives, as
    forward's `rows` does: another column is an error, not silently dropped."""
    message = r"dimension 'extra'.*neither a sample dimension"
    samples = rows([[0, 1, 1, 0], [0, 1, 1, 1]], names=ROW_NAMES + ["extra"])
    assert_fails(inverse(scripted), (torch.zeros(2, DIM), samples), message, scripted)
    conv = to_irreps(scripted)
    assert_fails(conv, (valid_input(), samples), message, scripted)


@scripted
def test_rows_on_another_device_than_the_tensor(scripted):
    conv = to_irreps(scripted)
    values = torch.tensor([[0, 1]], dtype=torch.int32, device="meta")
    wanted = Labels(SAMPLE_NAMES, values, assume_unique=True)
    assert_fails(conv, (valid_input(), wanted), r"rows are on meta.*input on cpu", scripted)


@scripted
def test_integer_input_in_e3nn_basis(scripted):
    module = from_irreps(scripted, "1x2e", basis="e3nn")
    samples = Labels(["system"], torch.tensor([[0]], dtype=torch.int32))
    x = torch.tensor([[1, 2, 3, 4, 5]])
    assert_fails(module, (x, samples), r"floating point.*torch\.int64", scripted)


# ---------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", DEVICES)
def test_device_mismatch(device):
    """A module left on the CPU and inputs on another device: a ValueError naming both
    devices, never a bare 'Expected all tensors to be on the same device'; once the
    module is moved with ``.to``, both directions run there."""
    if device == "cpu":
        pytest.skip("needs a second device")
    conv = TensorMapToIrreps(template(), basis="e3nn")
    tensor = valid_input()
    expected = conv(tensor)
    samples = conv.samples(tensor)
    inverse = conv.inverse()
    with pytest.raises(ValueError, match="cuda.*cpu"):
        conv(tensor.to(device))
    with pytest.raises(ValueError, match="cuda.*cpu"):
        inverse(expected.to(device), samples.to(device))
    conv.to(device)
    inverse.to(device)
    with pytest.raises(ValueError, match="samples are on cpu"):
        inverse(expected.to(device), samples)
    x = conv(tensor.to(device))
    torch.testing.assert_close(x.cpu(), expected, rtol=0, atol=1e-14)
    back = inverse(x, samples.to(device))
    assert back.keys.values.device.type == "cuda"
    for key, block in tensor.items():
        torch.testing.assert_close(back.block(key).values.cpu(), block.values, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------- construction


def test_template_lacks_irrep_keys():
    for dropped in ("o3_sigma", "o3_lambda"):
        names = [n for n in KEY_NAMES if n != dropped]
        keys = [[k[i] for i, n in enumerate(KEY_NAMES) if n != dropped] for k in TEMPLATE_KEYS[:4]]

        def blocks():
            return [spherical_block(0, SAMPLES[k[2]]) for k in TEMPLATE_KEYS[:4]]

        with pytest.raises(ValueError, match=rf"lack '{dropped}'"):
            TensorMapToIrreps(tensor_map(keys, blocks(), names=names))
        with pytest.raises(ValueError, match=rf"lack '{dropped}'"):
            IrrepsToTensorMap.from_tensor_map(tensor_map(keys, blocks(), names=names))


def test_template_invalid_sigma_or_lambda():
    for key, match in [
        ([0, 0, 1, 1], r"o3_lambda=0, o3_sigma=0.*o3_sigma must be \+1 or -1, got 0"),
        ([0, 2, 1, 1], r"o3_sigma=2.*o3_sigma must be \+1 or -1, got 2"),
        ([-1, 1, 1, 1], r"o3_lambda=-1.*o3_lambda must be non-negative"),
    ]:
        block = spherical_block(0, SAMPLES[1], components=[o3_mu([0])])
        with pytest.raises(ValueError, match=match):
            TensorMapToIrreps(tensor_map([key], [block]))


def test_template_o3_mu_invalid():
    for l, components, match in [
        (1, [o3_mu([1, 0, -1])], r"o3_lambda=1.*o3_mu components \[1, 0, -1\]"),
        (1, [o3_mu([-2, -1, 0, 1, 2])], r"o3_lambda=1.*o3_mu components \[-2, -1, 0, 1, 2\]"),
        (2, [], r"components \[\]"),
        (
            1,
            [Labels(["m"], torch.tensor([[-1], [0], [1]], dtype=torch.int32))],
            r"components \['m'\]",
        ),
    ]:
        block = spherical_block(l, SAMPLES[1], components=components)
        with pytest.raises(ValueError, match=match):
            TensorMapToIrreps(tensor_map([[l, 1, 1, 1]], [block]))


def test_template_gradients():
    block = spherical_block(0, SAMPLES[1])
    gradient = TensorBlock(
        values=torch.zeros(1, 3, 1, 2, dtype=torch.float64),
        samples=Labels(["sample", "system", "atom"], torch.tensor([[0, 0, 1]], dtype=torch.int32)),
        components=[Labels(["xyz"], torch.arange(3, dtype=torch.int32).reshape(-1, 1)), o3_mu([0])],
        properties=block.properties,
    )
    block.add_gradient("positions", gradient)
    with pytest.raises(ValueError, match=r"o3_lambda=0.*gradients.*featomic-torch's autograd"):
        TensorMapToIrreps(tensor_map([[0, 1, 1, 1]], [block]))


def test_template_empty():
    empty = TensorMap(Labels(KEY_NAMES, torch.zeros((0, 4), dtype=torch.int32)), [])
    with pytest.raises(ValueError, match="no blocks"):
        TensorMapToIrreps(empty)


def test_row_keys_invalid():
    for row_keys, match in [
        (["species"], r"row key 'species'"),
        (["o3_lambda"], r"row key 'o3_lambda'"),
        (["center_type", "center_type"], r"duplicates"),
    ]:
        with pytest.raises(ValueError, match=match):
            TensorMapToIrreps(template(), row_keys=row_keys)
        with pytest.raises(ValueError, match=match):
            IrrepsToTensorMap.from_tensor_map(template(), row_keys=row_keys)


def test_row_key_already_a_sample_dimension():
    names = ["system", "atom", "center_type"]
    blocks = [spherical_block(k[0], [[0, 0, 1]], sample_names=names) for k in TEMPLATE_KEYS]
    with pytest.raises(ValueError, match=r"row key 'center_type' is already a sample dimension"):
        TensorMapToIrreps(tensor_map(TEMPLATE_KEYS, blocks))


def test_invalid_options():
    for cls_options in ({"basis": "sphericart"}, {"layout": "mul_ir_mul"}):
        name, value = next(iter(cls_options.items()))
        match = rf"{name} must be one of .*'{value}'"
        with pytest.raises(ValueError, match=match):
            TensorMapToIrreps(template(), **cls_options)
        with pytest.raises(ValueError, match=match):
            IrrepsToTensorMap("1x0e", **cls_options)
        with pytest.raises(ValueError, match=match):
            IrrepsToTensorMap.from_tensor_map(template(), **cls_options)


def test_empty_irreps():
    for irreps in ("", "0x0e", "0x1o+0x2e"):
        with pytest.raises(ValueError, match="empty"):
            IrrepsToTensorMap(irreps)


def test_from_calculator_invalid():
    with pytest.raises(ValueError, match=r"from_calculator supports.*Linear"):
        TensorMapToIrreps.from_calculator(torch.nn.Linear(1, 1), [1, 8])


def test_irrep_without_properties():
    """An irrep whose every block has no property: either rejected at construction,
    naming it, or converted (zero channels) in both directions."""
    blocks = [
        spherical_block(k[0], SAMPLES[k[2]], properties=[] if k[0] == 1 else [[0], [1]])
        for k in TEMPLATE_KEYS
    ]
    tensor = tensor_map(TEMPLATE_KEYS, blocks)
    try:
        conv = TensorMapToIrreps(tensor, basis="featomic")
    except ValueError as error:
        assert re.search(r"o3_lambda=1", str(error)), str(error)
    else:
        x = conv(tensor)
        # the l = 1 blocks hold no value: the reference without them
        others = [i for i, k in enumerate(TEMPLATE_KEYS) if k[0] != 1]
        without = tensor_map(
            [TEMPLATE_KEYS[i] for i in others], [tensor.block(i).copy() for i in others]
        )
        expected, _, _ = reference_to_irreps(without, without, basis="featomic")
        assert torch.equal(x, expected)
        back = conv.inverse()(x, conv.samples(tensor))
        for key, block in tensor.items():
            assert torch.equal(back.block(key).values, block.values)

    try:
        module = IrrepsToTensorMap("2x0e+0x1o")
    except ValueError as error:
        assert "0x1o" in str(error), str(error)
    else:
        x = torch.randn(3, 2)
        out = module(x, Labels(["system"], torch.arange(3, dtype=torch.int32).reshape(-1, 1)))
        assert torch.equal(out.block({"o3_lambda": 0, "o3_sigma": 1}).values[:, 0, :], x)


def test_inverse_refuses_to_drop_values_in_channels_no_block_holds():
    """A layout from a batch without (O, Na): the rows of oxygen have no block for
    the Na channels. A model output with non-zero values there has nowhere to go."""
    from _reference import make_block

    def block(samples):
        return make_block(0, samples, [[0]])

    keys = Labels(["o3_lambda", "o3_sigma", "center_type", "neighbor_type"],
             torch.tensor([[0, 1, 8, 8], [0, 1, 11, 8], [0, 1, 11, 11]]))
    template = TensorMap(keys, [block([[0, 0]]), block([[0, 1]]), block([[0, 1]])])
    conv = TensorMapToIrreps(template, basis="featomic")
    samples = conv.samples(template)
    x = conv(template)
    # the round trip has zeros there: accepted
    conv.inverse()(x, samples)
    x = x.clone()
    x[0, 1] = 1.0  # the oxygen row, Na channel
    for module in (conv.inverse(), torch.jit.script(conv.inverse())):
        with pytest.raises((ValueError, torch.jit.Error), match="center_type=8"):
            module(x, samples)
    # check=False drops them knowingly
    inverse = TensorMapToIrreps(template, basis="featomic", check=False).inverse()
    out = inverse(x, samples)
    assert len(out) == 3


@scripted
def test_o3_mu_misordered_in_a_block_with_fewer_properties(scripted):
    """A block holding a subset of the template's properties is placed at them: its
    o3_mu components are still checked."""
    conv = to_irreps(scripted)
    block = spherical_block(1, SAMPLES[1], properties=[[1]], components=[o3_mu([1, 0, -1])])
    tensor = with_every_center([[1, 1, 1, 1]], [block])
    assert_fails(conv, (tensor,), r"o3_lambda=1.*o3_mu components \[1, 0, -1\]", scripted)
