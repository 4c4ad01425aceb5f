"""Property tests: random valid layouts and inputs against the slow references.

Layouts mix every shape featomic and λ-SOAP can produce: random subsets of keys
(o3_lambda up to 8, o3_sigma = ±1), zero to two channel-like key dimensions, one
row-like key dimension or none, properties that differ between blocks (one or two
property dimensions), samples that differ between blocks of one center type, empty
blocks, zero rows, shuffled keys and key dimensions, float32 and float64.
"""

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from metatensor.torch import Labels, TensorBlock, TensorMap

from _reference import reference_to_irreps, reference_to_tensor_map
from rascaline_e3nn import TensorMapToIrreps


SAMPLE_NAMES = ["system", "atom"]
CHANNEL_KEYS = ["neighbor_type", "second_type"]
#: every (system, atom) a block may hold
SAMPLE_GRID = [(s, a) for s in range(3) for a in range(4)]
BASES = ["featomic", "e3nn"]
LAYOUTS = ["mul_ir", "ir_mul"]
DTYPES = [torch.float32, torch.float64]

#: sized so that the file runs in ~30 s on two cores: building a module computes
#: e3nn's change of basis for every l (~15 ms each), the references loop in Python
SETTINGS = settings(
    deadline=None,
    max_examples=50,
    # hypothesis' explain phase trips on its own assertion (6.155) with these
    # strategies; the falsifying example is still printed without it
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@dataclass
class Case:
    template: TensorMap
    tensor: TensorMap
    row_keys: List[str]

    def __repr__(self) -> str:
        return (
            f"Case(row_keys={self.row_keys},\n  template={describe(self.template)},"
            f"\n  tensor={describe(self.tensor)})"
        )


def describe(tensor: TensorMap) -> str:
    """Every key with its samples, properties and dtype: enough to rebuild a failure."""
    lines = [f"keys {tensor.keys.names}"]
    for key, b in zip(tensor.keys.values.tolist(), tensor.blocks()):
        lines.append(
            f"    {key}: samples={b.samples.values.tolist()} "
            f"properties={b.properties.names}={b.properties.values.tolist()} "
            f"dtype={b.values.dtype}"
        )
    return "\n".join(lines)




# ---------------------------------------------------------------------- builders


def o3_mu(l: int) -> Labels:
    return Labels(["o3_mu"], torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1))


def block(l, samples, properties, property_names, values) -> TensorBlock:
    return TensorBlock(
        values=values,
        samples=Labels(
            SAMPLE_NAMES, torch.tensor(samples, dtype=torch.int32).reshape(-1, 2)
        ),
        components=[o3_mu(l)],
        properties=Labels(
            list(property_names),
            torch.tensor(properties, dtype=torch.int32).reshape(-1, len(property_names)),
        ),
    )


def tensor_map(key_names, keys: List[Dict[str, int]], blocks) -> TensorMap:
    values = torch.tensor(
        [[k[n] for n in key_names] for k in keys], dtype=torch.int32
    ).reshape(-1, len(key_names))
    return TensorMap(Labels(list(key_names), values), blocks)


def key_dict(names: List[str], values) -> Dict[str, int]:
    return {n: int(v) for n, v in zip(names, values)}


# ---------------------------------------------------------------------- strategies


@st.composite
def layouts(draw, max_l: int = 8, max_irreps: int = 3):
    """(key names, template keys, property names, properties of each template key,
    row keys) of a random valid layout."""
    row_keys = draw(st.sampled_from([[], ["center_type"]]))
    channel_keys = CHANNEL_KEYS[: draw(st.integers(0, 2))]
    key_names = draw(st.permutations(["o3_lambda", "o3_sigma"] + row_keys + channel_keys))
    irreps = draw(
        st.lists(
            st.tuples(st.integers(0, max_l), st.sampled_from([-1, 1])),
            min_size=1,
            max_size=max_irreps,
            unique=True,
        )
    )
    axes = [[dict(o3_lambda=l, o3_sigma=s) for l, s in irreps]]
    for name in row_keys + channel_keys:
        types = draw(st.lists(st.sampled_from([1, 6, 8]), min_size=1, max_size=2, unique=True))
        axes.append([{name: t} for t in types])
    every = [
        dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)
    ]
    n_keys = min(draw(st.integers(1, 8)), len(every))
    keys = draw(
        st.lists(
            st.sampled_from(every),
            min_size=n_keys,
            max_size=n_keys,
            unique_by=lambda k: tuple(sorted(k.items())),
        )
    )
    keys = draw(st.permutations(keys))

    property_names = draw(st.sampled_from([["n"], ["n", "k"]]))
    if property_names == ["n"]:
        grid = [(n,) for n in range(4)]
    else:
        grid = [(n, k) for n in range(3) for k in range(2)]
    properties = []
    for _ in keys:
        # any subset in any order, empty blocks included
        properties.append(draw(st.lists(st.sampled_from(grid), max_size=4, unique=True)))
    # every irrep needs at least one channel somewhere in the layout
    seen = set()
    for key, props in zip(keys, properties):
        if props:
            seen.add((key["o3_lambda"], key["o3_sigma"]))
    for key, props in zip(keys, properties):
        irrep = (key["o3_lambda"], key["o3_sigma"])
        if irrep not in seen:
            props.append(grid[0])
            seen.add(irrep)
    return key_names, keys, property_names, properties, row_keys


@st.composite
def cases(draw, dtype=None, max_l: int = 8, distinct: bool = False, trusted: bool = False) -> Case:
    """A template of a random layout and an input using part of it. ``trusted``: an
    input as the template's producer (featomic) gives them, which ``check=False``
    takes: the blocks of a row group share their samples, and a block with every
    property of the template's block has them in the template's order."""
    key_names, keys, property_names, properties, row_keys = draw(layouts(max_l=max_l))
    if dtype is None:
        dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)

    # the template: only its metadata matters, so its values and samples are arbitrary
    template_dtype = draw(st.sampled_from(DTYPES))
    template_samples = draw(st.lists(st.sampled_from(SAMPLE_GRID), max_size=2, unique=True))
    template_blocks = []
    for key, props in zip(keys, properties):
        l = key["o3_lambda"]
        values = torch.randn(
            len(template_samples), 2 * l + 1, len(props), dtype=template_dtype, generator=generator
        )
        template_blocks.append(block(l, template_samples, props, property_names, values))
    template = tensor_map(key_names, keys, template_blocks)

    # the input: a subset of the keys (most of them), in any order, with the key
    # dimensions in another order
    chosen = [i for i in range(len(keys)) if draw(st.sampled_from([True, True, True, False]))]
    chosen = draw(st.permutations(chosen))
    input_names = draw(st.permutations(key_names))
    shared: Dict[Tuple[int, ...], List[Tuple[int, int]]] = {}
    # blocks of one row group often share their samples
    share = True if trusted else draw(st.booleans())
    blocks = []
    counter = 1
    input_keys = []
    for index in chosen:
        key = keys[index]
        l = key["o3_lambda"]
        props = []
        if properties[index]:  # any subset in any order, rarely none
            least = draw(st.sampled_from([1, 1, 1, 1, 1, 0]))
            props = draw(st.lists(st.sampled_from(properties[index]), min_size=least, unique=True))
            if trusted and len(props) == len(properties[index]):
                props = list(properties[index])
        group = tuple(key[n] for n in row_keys)
        if share and group in shared:
            samples = shared[group]
        else:  # any samples in any order, sometimes none
            least = draw(st.sampled_from([1, 1, 1, 1, 1, 0]))
            samples = draw(
                st.lists(st.sampled_from(SAMPLE_GRID), min_size=least, max_size=5, unique=True)
            )
            shared[group] = samples
        shape = (len(samples), 2 * l + 1, len(props))
        if distinct:
            size = shape[0] * shape[1] * shape[2]
            values = torch.arange(counter, counter + size, dtype=dtype).reshape(shape)
            counter += size
        else:
            values = torch.randn(shape, dtype=dtype, generator=generator)
        blocks.append(block(l, samples, props, property_names, values))
        input_keys.append(key)
    tensor = tensor_map(input_names, input_keys, blocks)
    return Case(template=template, tensor=tensor, row_keys=row_keys)


# ---------------------------------------------------------------------- checks


def tolerance(dtype: torch.dtype, basis: str) -> float:
    if basis == "featomic":
        return 0.0
    return 1e-12 if dtype == torch.float64 else 1e-5


def effective_row_keys(template: TensorMap, row_keys: Optional[List[str]]) -> List[str]:
    if row_keys is not None:
        return list(row_keys)
    return ["center_type"] if "center_type" in template.keys.names else []


def keys_of(tensor: TensorMap) -> List[Dict[str, int]]:
    return [key_dict(tensor.keys.names, k) for k in tensor.keys.values]


def check_forward(conv, template, tensor, row_keys, basis, layout):
    """``conv(tensor)`` and ``conv.samples(tensor)`` equal the reference."""
    x = conv(tensor)
    rows = conv.samples(tensor)
    expected, expected_rows, irreps = reference_to_irreps(
        tensor, template, basis=basis, layout=layout, row_keys=row_keys
    )
    assert str(conv.irreps_out) == irreps
    assert rows.names == SAMPLE_NAMES + effective_row_keys(template, row_keys)
    assert [tuple(r) for r in rows.values.tolist()] == expected_rows
    assert x.shape == expected.shape
    if len(tensor) > 0:
        assert x.dtype == tensor.block(0).values.dtype
    atol = tolerance(x.dtype, basis)
    error = (x.to(torch.float64) - expected).abs().max().item() if x.numel() else 0.0
    assert error <= atol, f"max error {error} > {atol}"
    return x, rows


def check_round_trip(conv, template, tensor, row_keys, basis, x=None, samples=None):
    """``conv.inverse()(conv(T), conv.samples(T))`` gives back every block of T, and
    zeros for everything the layout has beyond T."""
    if x is None:
        x = conv(tensor)
    if samples is None:
        samples = conv.samples(tensor)
    back = conv.inverse()(x, samples)
    rows = conv.samples(tensor)
    row_keys = effective_row_keys(template, row_keys)
    input_keys = keys_of(tensor)

    assert back.keys.names == template.keys.names
    assert len(back) == len(template.keys)
    n_samples = len(SAMPLE_NAMES)
    # the basis change and its transpose: D^T D = 1 to ~1e-16
    round_trip_atol = 1e-13 if x.dtype == torch.float64 else 1e-5

    for key in keys_of(template):
        out = back.block(key)
        l = key["o3_lambda"]
        assert out.samples.names == SAMPLE_NAMES
        assert len(out.components) == 1 and out.components[0] == o3_mu(l)
        assert out.properties == template.block(key).properties
        assert out.values.dtype == x.dtype
        # the block's rows are every row of its group, in the order of x
        group = tuple(key[n] for n in row_keys)
        expected_samples = [
            tuple(r[:n_samples]) for r in rows.values.tolist() if tuple(r[n_samples:]) == group
        ]
        assert [tuple(s) for s in out.samples.values.tolist()] == expected_samples

        covered = torch.zeros(out.values.shape, dtype=torch.bool)
        if key in input_keys:
            original = tensor.block(key)
            sample_index = {tuple(s): i for i, s in enumerate(out.samples.values.tolist())}
            property_index = {tuple(p): j for j, p in enumerate(out.properties.values.tolist())}
            for i, sample in enumerate(original.samples.values.tolist()):
                for j, prop in enumerate(original.properties.values.tolist()):
                    a, b = sample_index[tuple(sample)], property_index[tuple(prop)]
                    got = out.values[a, :, b]
                    want = original.values[i, :, j]
                    if basis == "featomic":
                        assert torch.equal(got, want), (key, sample, prop)
                    else:
                        error = (got - want).abs().max().item()
                        assert error <= round_trip_atol, (key, sample, prop, error)
                    covered[a, :, b] = True
        beyond = out.values[~covered]
        assert torch.all(beyond == 0), f"block {key}: nonzero entries beyond the input"
    return back


# ---------------------------------------------------------------------- tests


@given(
    case=cases(),
    basis=st.sampled_from(BASES),
    layout=st.sampled_from(LAYOUTS),
)
@SETTINGS
def test_matches_reference(case, basis, layout):
    conv = TensorMapToIrreps(
        case.template, basis=basis, layout=layout, row_keys=case.row_keys
    )
    check_forward(conv, case.template, case.tensor, case.row_keys, basis, layout)


@given(
    case=cases(trusted=True),
    basis=st.sampled_from(BASES),
    layout=st.sampled_from(LAYOUTS),
)
@SETTINGS
def test_unchecked_matches_reference(case, basis, layout):
    """check=False on inputs as featomic gives them (the blocks of a row group share
    their samples, full property sets in the template's order; keys of any order,
    subset and dimension order): the same as the reference."""
    conv = TensorMapToIrreps(
        case.template, basis=basis, layout=layout, row_keys=case.row_keys, check=False
    )
    check_forward(conv, case.template, case.tensor, case.row_keys, basis, layout)


@given(
    case=cases(distinct=True), layout=st.sampled_from(LAYOUTS)
)
@SETTINGS
def test_every_value_exactly_once(case, layout):
    """With distinct inputs 1..N: outputs are a permutation of them plus exact zeros."""
    conv = TensorMapToIrreps(
        case.template, basis="featomic", layout=layout, row_keys=case.row_keys
    )
    x = conv(case.tensor)
    inputs = torch.cat([b.values.reshape(-1) for b in case.tensor.blocks()] + [torch.zeros(0)])
    n = inputs.numel()
    nonzero = torch.sort(x[x != 0].to(torch.float64)).values
    assert torch.equal(nonzero, torch.arange(1, n + 1, dtype=torch.float64))
    assert int((x == 0).sum()) == x.numel() - n


@given(
    case=cases(),
    basis=st.sampled_from(BASES),
    layout=st.sampled_from(LAYOUTS),
)
@settings(SETTINGS, max_examples=35)
def test_round_trip(case, basis, layout):
    conv = TensorMapToIrreps(
        case.template, basis=basis, layout=layout, row_keys=case.row_keys
    )
    check_round_trip(conv, case.template, case.tensor, case.row_keys, basis)


@given(
    layout_data=layouts(),
    basis=st.sampled_from(BASES),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
@settings(SETTINGS, max_examples=35)
def test_inverse_matches_reference(layout_data, basis, layout, dtype, data):
    """``IrrepsToTensorMap`` reads arbitrary (not only round-tripped) tensors and rows
    in any order like the one-value-at-a-time reference."""
    key_names, keys, property_names, properties, row_keys = layout_data
    blocks = []
    for k, props in zip(keys, properties):
        l = k["o3_lambda"]
        values = torch.zeros(0, 2 * l + 1, len(props), dtype=torch.float64)
        blocks.append(block(l, [], props, property_names, values))
    template = tensor_map(key_names, keys, blocks)
    groups = sorted({tuple(k[n] for n in row_keys) for k in keys})
    every_row = [s + g for s in SAMPLE_GRID for g in groups]
    rows = data.draw(st.lists(st.sampled_from(every_row), max_size=8, unique=True))
    conv = TensorMapToIrreps(template, basis=basis, layout=layout, row_keys=row_keys)
    # values in channels that no block holds for their rows are dropped knowingly
    # here (check=False); what check=True does with them is tested below
    inverse = TensorMapToIrreps(
        template, basis=basis, layout=layout, row_keys=row_keys, check=False
    ).inverse()
    seed = data.draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(rows), conv.irreps_out.dim, dtype=dtype, generator=generator)
    names = SAMPLE_NAMES + row_keys
    samples = Labels(names, torch.tensor(rows, dtype=torch.int32).reshape(len(rows), len(names)))
    back = inverse(x, samples)
    expected = reference_to_tensor_map(
        x, rows, template, basis=basis, layout=layout, row_keys=row_keys
    )
    atol = tolerance(dtype, basis)
    for key_values, per_sample in expected.items():
        key = dict(zip(template.keys.names, key_values))
        out = back.block(key)
        got_samples = [tuple(s) for s in out.samples.values.tolist()]
        assert got_samples == list(per_sample)
        for i, sample in enumerate(got_samples):
            difference = out.values[i].to(torch.float64) - per_sample[sample]
            error = difference.abs().max().item() if difference.numel() else 0.0
            assert error <= atol, (key, sample, error)

    # with check=True, nothing is dropped: a value in a channel that no block holds
    # for its row is refused, and once those are zero, converting the output back
    # gives x again
    columns = conv.plan.column_map(basis, layout)
    _, widths = conv.plan.offsets()
    holes = torch.stack([columns[g] == widths[g] for g in range(len(groups))])
    group_of = [groups.index(tuple(r[len(SAMPLE_NAMES):])) for r in rows]
    in_holes = holes[group_of] if rows else torch.zeros(0, x.shape[1], dtype=torch.bool)
    if bool(in_holes.any()):
        with pytest.raises(ValueError, match="would be dropped"):
            conv.inverse()(x, samples)
        x = torch.where(in_holes, torch.zeros_like(x), x)
    checked = conv.inverse()(x, samples)
    if len(rows) == 0:
        return
    again = conv(checked)
    order = [tuple(r) for r in conv.samples(checked).values.tolist()]
    assert sorted(order) == sorted(rows)
    index = torch.tensor([order.index(r) for r in rows])
    torch.testing.assert_close(again[index], x, rtol=0, atol=atol)


@given(
    rows=st.lists(
        st.tuples(st.integers(-3, 3), st.integers(-3, 3), st.integers(0, 2)), max_size=40
    )
)
@SETTINGS
def test_unique_rows_matches_torch_unique(rows):
    """The union of samples (the distinct sorted rows and the run of every row, as
    sorted_runs gives them) equals torch.unique(dim=0), which it replaces for speed
    and to read nothing back to the host."""
    from rascaline_e3nn._batch import sorted_runs

    values = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), 3)
    _, ordered, new, inverse = sorted_runs(values, 3)
    union = ordered[new]
    expected, expected_inverse = torch.unique(
        values, sorted=True, return_inverse=True, dim=0
    )
    assert torch.equal(union, expected.reshape(-1, 3))
    assert torch.equal(inverse, expected_inverse.reshape(-1))
