"""Fuzzing the metadata of both adapters, valid and invalid alike.

Each example is a random valid layout and input (the strategies of
``test_properties``) with zero or more corruptions of the template, of the input
TensorMap, or of the (tensor, samples) given to the inverse. Whatever the corruption:

- a valid template and input convert, and match the slow reference (and round trip);
- an invalid one raises ValueError: never another exception, never a result;
- a few corner cases where both answers are sound (an irrep with no property at all,
  integer values where no rounding can happen) may do either.

Not part of the default test command (``-m "not fuzz"``); run it with
``python -m pytest tests/test_fuzz.py -m fuzz``.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
import torch
from e3nn import o3
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st
from metatensor.torch import Labels, TensorBlock, TensorMap

from _reference import reference_to_irreps
from rascaline_e3nn import TensorMapToIrreps
from test_properties import (
    SAMPLE_GRID,
    SAMPLE_NAMES,
    check_forward,
    check_round_trip,
    describe,
    effective_row_keys,
    layouts,
)


pytestmark = pytest.mark.fuzz

#: the budget; override with RASCALINE_E3NN_FUZZ_EXAMPLES
MAX_EXAMPLES = int(os.environ.get("RASCALINE_E3NN_FUZZ_EXAMPLES", "2000"))

TEMPLATE_CORRUPTIONS = [
    "drop o3_sigma",
    "drop o3_lambda",
    "rename o3_sigma",
    "sigma 0",
    "sigma 2",
    "negative lambda",
    "reversed o3_mu",
    "o3_mu too long",
    "o3_mu renamed",
    "no components",
    "gradients",
    "duplicated key",
    "row key in samples",
    "irrep without properties",  # either
]

#: the ``row_keys`` argument, given once
ROW_KEY_OPTIONS = [
    "as planned",
    "as planned",
    "as planned",
    "default",  # valid
    "channel key too",  # valid: another choice of rows
    "unknown",
    "o3_lambda",
    "twice",
]

INPUT_CORRUPTIONS = [
    "unknown lambda",
    "unknown type",
    "drop key dimension",
    "extra key dimension",
    "reversed o3_mu",
    "o3_mu too long",
    "o3_mu renamed",
    "no components",
    "foreign property",
    "property renamed",
    "property names reversed",
    "extra property dimension",
    "sample renamed",
    "samples reordered",
    "extra sample dimension",
    "duplicated samples",
    "duplicated key",
    "gradients",
    "integers",  # invalid where a dense change of basis would round them, else either
]

INVERSE_CORRUPTIONS = [
    "too wide",
    "too narrow",
    "one-dimensional",
    "samples too short",
    "samples lack a dimension",
    "samples lack the row key",
    "unknown row key",
    "duplicated after dropping a column",
    "duplicated samples",
    "integers",
    "columns reordered",  # valid
    "extra unique column",  # refused: a column forward's rows would refuse too
]


@dataclass
class Fuzz:
    template: TensorMap
    tensor: TensorMap
    row_keys: Optional[List[str]]
    basis: str
    layout: str
    template_faults: List[str] = field(default_factory=list)
    input_faults: List[str] = field(default_factory=list)
    #: faults that may be accepted or rejected
    template_either: List[str] = field(default_factory=list)
    input_either: List[str] = field(default_factory=list)
    inverse_fault: Optional[str] = None
    seed: int = 0

    def __repr__(self) -> str:
        return (
            f"Fuzz(basis={self.basis!r}, layout={self.layout!r}, row_keys={self.row_keys},"
            f"\n  template faults={self.template_faults} either={self.template_either},"
            f"\n  input faults={self.input_faults} either={self.input_either},"
            f"\n  inverse fault={self.inverse_fault!r},"
            f"\n  template={describe(self.template)},\n  tensor={describe(self.tensor)})"
        )


# ---------------------------------------------------------------------- building


@dataclass
class RawBlock:
    """Everything needed to build a TensorBlock, easy to corrupt."""

    l: int
    samples: List[List[int]]
    sample_names: List[str]
    mu: Optional[List[int]]  # None: no components
    mu_name: str
    properties: List[List[int]]
    property_names: List[str]
    dtype: torch.dtype
    gradient: bool = False
    unique_samples: bool = True

    def build(self, generator) -> TensorBlock:
        components = []
        if self.mu is not None:
            mu = torch.tensor(self.mu, dtype=torch.int32).reshape(-1, 1)
            components = [Labels([self.mu_name], mu)]
        shape = [len(self.samples)] + [len(c) for c in components] + [len(self.properties)]
        if self.dtype.is_floating_point:
            values = torch.randn(shape, dtype=torch.float64, generator=generator).to(self.dtype)
        else:
            values = torch.randint(-9, 10, shape, dtype=self.dtype, generator=generator)
        samples = torch.tensor(self.samples, dtype=torch.int32).reshape(
            len(self.samples), len(self.sample_names)
        )
        properties = torch.tensor(self.properties, dtype=torch.int32).reshape(
            len(self.properties), len(self.property_names)
        )
        if self.unique_samples:
            sample_labels = Labels(self.sample_names, samples)
        else:
            sample_labels = Labels(self.sample_names, samples, assume_unique=True)
        block = TensorBlock(
            values=values,
            samples=sample_labels,
            components=components,
            properties=Labels(self.property_names, properties),
        )
        if self.gradient:
            # metatensor wants the same gradients in every block; no gradient sample
            # is needed to make the block invalid for the adapters
            gradient = TensorBlock(
                values=torch.zeros([0, 3] + shape[1:], dtype=values.dtype),
                samples=Labels(
                    ["sample", "system", "atom"], torch.zeros((0, 3), dtype=torch.int32)
                ),
                components=[Labels(["xyz"], torch.arange(3, dtype=torch.int32).reshape(-1, 1))]
                + components,
                properties=block.properties,
            )
            block.add_gradient("positions", gradient)
        return block


def build(key_names, keys, raw_blocks, generator, unique_keys=True) -> TensorMap:
    values = torch.tensor(keys, dtype=torch.int32).reshape(len(keys), len(key_names))
    if unique_keys:
        labels = Labels(key_names, values)
    else:
        labels = Labels(key_names, values, assume_unique=True)
    blocks = [b.build(generator) for b in raw_blocks]
    try:
        return TensorMap(labels, blocks)
    except RuntimeError as error:
        # metadata metatensor itself refuses (e.g. blocks with different numbers of
        # components) can never reach the adapters: not a case
        assume("invalid parameter" not in str(error))
        raise


def pick(draw, options, n_max=2):
    """Zero (most often) to n_max distinct entries of options."""
    n = draw(st.sampled_from([0, 0, 0, 1, 1, 2][: 4 + n_max]))
    return draw(st.lists(st.sampled_from(options), min_size=n, max_size=n, unique=True))


@st.composite
def fuzz_cases(draw) -> Fuzz:
    key_names, keys, property_names, properties, row_keys = draw(layouts(max_l=6))
    keys = [dict(k) for k in keys]
    properties = [[list(p) for p in props] for props in properties]
    basis = draw(st.sampled_from(["featomic", "e3nn"]))
    layout = draw(st.sampled_from(["mul_ir", "ir_mul"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    fuzz_faults: List[str] = []
    fuzz_either: List[str] = []

    # ------------------------------------------------------------------ template
    template_sample_names = list(SAMPLE_NAMES)
    template_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    template_raw = [
        RawBlock(
            l=k["o3_lambda"],
            samples=[],
            sample_names=template_sample_names,
            mu=list(range(-k["o3_lambda"], k["o3_lambda"] + 1)),
            mu_name="o3_mu",
            properties=p,
            property_names=list(property_names),
            dtype=template_dtype,
        )
        for k, p in zip(keys, properties)
    ]
    template_names = list(key_names)
    template_keys = [dict(k) for k in keys]
    row_keys_arg: Optional[List[str]] = list(row_keys)
    unique_template_keys = True
    for fault in pick(draw, TEMPLATE_CORRUPTIONS):
        index = draw(st.integers(0, len(template_keys) - 1))
        l = template_keys[index]["o3_lambda"]
        if fault in ("drop o3_sigma", "drop o3_lambda"):
            name = fault.split()[1]
            if name not in template_names or len(template_names) == 1:
                continue
            template_names.remove(name)
            fuzz_faults.append(fault)
        elif fault == "rename o3_sigma":
            if "o3_sigma" not in template_names:
                continue
            template_names[template_names.index("o3_sigma")] = "parity"
            for k in template_keys:
                k["parity"] = k.pop("o3_sigma")
            fuzz_faults.append(fault)
        elif fault in ("sigma 0", "sigma 2"):
            if "o3_sigma" not in template_keys[index]:
                continue
            template_keys[index]["o3_sigma"] = int(fault[-1])
            fuzz_faults.append(fault)
        elif fault == "negative lambda":
            if "o3_lambda" not in template_keys[index]:
                continue
            template_keys[index]["o3_lambda"] = -1
            template_raw[index].mu = [0]
            fuzz_faults.append(fault)
        elif fault == "reversed o3_mu":
            if l == 0 or template_raw[index].mu is None:
                continue
            template_raw[index].mu = template_raw[index].mu[::-1]
            fuzz_faults.append(fault)
        elif fault == "o3_mu too long":
            if template_raw[index].mu is None:
                continue
            template_raw[index].mu = list(range(-l - 1, l + 2))
            fuzz_faults.append(fault)
        elif fault == "o3_mu renamed":
            for b in template_raw:
                b.mu_name = "m"
            fuzz_faults.append(fault)
        elif fault == "no components":
            for b in template_raw:
                b.mu = None
            fuzz_faults.append(fault)
        elif fault == "gradients":
            for b in template_raw:
                b.gradient = True
            fuzz_faults.append(fault)
        elif fault == "duplicated key":
            template_keys.append(dict(template_keys[index]))
            original = template_raw[index]
            foreign = [[9] * len(property_names)]
            template_raw.append(RawBlock(**{**original.__dict__, "properties": foreign}))
            unique_template_keys = False
            fuzz_faults.append(fault)
        elif fault == "row key in samples":
            if not row_keys:
                continue
            template_sample_names.append("center_type")
            for b in template_raw:
                b.sample_names = template_sample_names
            fuzz_faults.append(fault)
        elif fault == "irrep without properties":
            irrep = (template_keys[index].get("o3_lambda"), template_keys[index].get("o3_sigma"))
            for k, b in zip(template_keys, template_raw):
                if (k.get("o3_lambda"), k.get("o3_sigma")) == irrep:
                    b.properties = []
            fuzz_either.append(fault)

    option = draw(st.sampled_from(ROW_KEY_OPTIONS))
    channel = [n for n in key_names if n not in ("o3_lambda", "o3_sigma", "center_type")]
    if option == "default":
        row_keys_arg = None
    elif option == "channel key too" and channel:
        row_keys_arg = row_keys + channel[:1]
    elif option == "unknown":
        row_keys_arg = ["species"]
        fuzz_faults.append("row key " + option)
    elif option == "o3_lambda":
        row_keys_arg = ["o3_lambda"]
        fuzz_faults.append("row key " + option)
    elif option == "twice" and row_keys:
        row_keys_arg = row_keys * 2
        fuzz_faults.append("row key " + option)

    dimensions = [n for n in template_names]
    template_values = [[k[n] for n in dimensions] for k in template_keys]
    if len({tuple(v) for v in template_values}) != len(template_values) and unique_template_keys:
        assume(False)  # dropping a dimension made two keys equal: metatensor refuses
    template = build(dimensions, template_values, template_raw, generator, unique_template_keys)

    # ------------------------------------------------------------------ input
    # the input is built from the valid layout: corruptions of the template do not
    # leak into it (its checks run only once the template is accepted)
    chosen = [i for i in range(len(keys)) if draw(st.sampled_from([True, True, True, False]))]
    chosen = draw(st.permutations(chosen))
    input_faults: List[str] = []
    input_either: List[str] = []
    input_keys = []
    input_raw = []
    shared = {}
    for i in chosen:
        key = keys[i]
        props = properties[i]
        if "irrep without properties" in fuzz_either:
            props = template_raw[i].properties
        if props:
            least = draw(st.sampled_from([1, 1, 1, 0]))
            props = draw(st.lists(st.sampled_from(props), min_size=least, unique_by=tuple))
        group = tuple(key[n] for n in row_keys)
        if group not in shared or draw(st.booleans()):
            shared[group] = draw(st.lists(st.sampled_from(SAMPLE_GRID), max_size=4, unique=True))
        input_keys.append(dict(key))
        input_raw.append(
            RawBlock(
                l=key["o3_lambda"],
                samples=[list(s) for s in shared[group]],
                sample_names=list(SAMPLE_NAMES),
                mu=list(range(-key["o3_lambda"], key["o3_lambda"] + 1)),
                mu_name="o3_mu",
                properties=[list(p) for p in props],
                property_names=list(property_names),
                dtype=dtype,
            )
        )
    input_names = list(draw(st.permutations(key_names)))
    unique_input_keys = True
    faults = pick(draw, INPUT_CORRUPTIONS) if input_raw else []
    for fault in faults:
        index = draw(st.integers(0, len(input_raw) - 1))
        raw = input_raw[index]
        l = raw.l
        if fault == "unknown lambda":
            new = dict(input_keys[index])
            new["o3_lambda"] = 7  # layouts use l <= 6
            input_keys.append(new)
            input_raw.append(RawBlock(**{**raw.__dict__, "l": 7, "mu": list(range(-7, 8))}))
            input_faults.append(fault)
        elif fault == "unknown type":
            other = [n for n in key_names if n not in ("o3_lambda", "o3_sigma")]
            if not other:
                continue
            new = dict(input_keys[index])
            new[other[0]] = 99
            input_keys.append(new)
            input_raw.append(RawBlock(**raw.__dict__))
            input_faults.append(fault)
        elif fault == "drop key dimension":
            name = draw(st.sampled_from([n for n in input_names if n in key_names]))
            input_names.remove(name)
            input_faults.append(fault)
        elif fault == "extra key dimension":
            input_names.append("spin")
            for k in input_keys:
                k["spin"] = 0
            input_faults.append(fault)
        elif fault == "reversed o3_mu":
            if l == 0 or raw.mu is None:
                continue
            raw.mu = raw.mu[::-1]
            input_faults.append(fault)
        elif fault == "o3_mu too long":
            if raw.mu is None:
                continue
            raw.mu = list(range(-l - 1, l + 2))
            input_faults.append(fault)
        elif fault == "o3_mu renamed":
            for b in input_raw:
                b.mu_name = "m"
            input_faults.append(fault)
        elif fault == "no components":
            for b in input_raw:
                b.mu = None
            input_faults.append(fault)
        elif fault == "foreign property":
            raw.properties = raw.properties + [[9] * len(raw.property_names)]
            input_faults.append(fault)
        elif fault == "property renamed":
            for b in input_raw:
                b.property_names = ["q"] + b.property_names[1:]
            input_faults.append(fault)
        elif fault == "property names reversed":
            if len(property_names) < 2:
                continue
            for b in input_raw:
                b.property_names = b.property_names[::-1]
            input_faults.append(fault)
        elif fault == "extra property dimension":
            for b in input_raw:
                b.property_names = b.property_names + ["extra"]
                b.properties = [p + [0] for p in b.properties]
            input_faults.append(fault)
        elif fault == "sample renamed":
            for b in input_raw:
                b.sample_names = ["structure"] + b.sample_names[1:]
            input_faults.append(fault)
        elif fault == "samples reordered":
            for b in input_raw:
                b.sample_names = [b.sample_names[1], b.sample_names[0]] + b.sample_names[2:]
            input_faults.append(fault)
        elif fault == "extra sample dimension":
            for b in input_raw:
                b.sample_names = b.sample_names + ["extra"]
                b.samples = [s + [0] for s in b.samples]
            input_faults.append(fault)
        elif fault == "duplicated samples":
            if not raw.samples:
                continue
            raw.samples = raw.samples + [raw.samples[0]]
            raw.unique_samples = False
            input_faults.append(fault)
        elif fault == "duplicated key":
            input_keys.append(dict(input_keys[index]))
            input_raw.append(RawBlock(**raw.__dict__))
            unique_input_keys = False
            input_faults.append(fault)
        elif fault == "gradients":
            for b in input_raw:
                b.gradient = True
            input_faults.append(fault)
        elif fault == "integers":
            for b in input_raw:
                b.dtype = torch.int64
            rounded = basis == "e3nn" and any(
                b.l >= 2 and b.samples and b.properties and b.mu is not None for b in input_raw
            )
            (input_faults if rounded else input_either).append(fault)

    values = [[k.get(n, 0) for n in input_names] for k in input_keys]
    if len({tuple(v) for v in values}) != len(values):
        unique_input_keys = False
        if "duplicated key" not in input_faults:
            input_faults.append("duplicated key")
    tensor = build(input_names, values, input_raw, generator, unique_input_keys)

    inverse_fault = None
    if not fuzz_faults and not input_faults and draw(st.booleans()):
        inverse_fault = draw(st.sampled_from(INVERSE_CORRUPTIONS))

    return Fuzz(
        template=template,
        tensor=tensor,
        row_keys=row_keys_arg,
        basis=basis,
        layout=layout,
        template_faults=fuzz_faults,
        input_faults=input_faults,
        template_either=fuzz_either,
        input_either=input_either,
        inverse_fault=inverse_fault,
        seed=seed,
    )


# ---------------------------------------------------------------------- checks


def without_empty_irreps(tensor: TensorMap, template: TensorMap) -> TensorMap:
    """The reference knows no irrep without properties: drop those blocks (they hold
    no value)."""
    names = template.keys.names
    full = set()
    for key, block in zip(template.keys.values.tolist(), template.blocks()):
        k = dict(zip(names, key))
        if len(block.properties) > 0:
            full.add((k["o3_lambda"], k["o3_sigma"]))
    kept_keys, kept_blocks = [], []
    for key, block in zip(tensor.keys.values.tolist(), tensor.blocks()):
        k = dict(zip(tensor.keys.names, key))
        if (k["o3_lambda"], k["o3_sigma"]) in full:
            kept_keys.append(key)
            kept_blocks.append(block.copy())
    values = torch.tensor(kept_keys, dtype=torch.int32)
    values = values.reshape(len(kept_keys), len(tensor.keys.names))
    return TensorMap(Labels(tensor.keys.names, values), kept_blocks)


def check_forward_empty_irreps(conv, case: Fuzz, x, samples):
    """The reference knows no irrep without properties: compare the other columns to
    the reference without those blocks, on the rows it has; the other rows (samples
    of blocks without properties only) must be zeros."""
    row_keys = effective_row_keys(case.template, case.row_keys)
    expected_rows = set()
    for key, block in zip(case.tensor.keys.values.tolist(), case.tensor.blocks()):
        k = dict(zip(case.tensor.keys.names, key))
        for sample in block.samples.values.tolist():
            expected_rows.add(tuple(sample) + tuple(k[n] for n in row_keys))
    rows = [tuple(r) for r in samples.values.tolist()]
    assert rows == sorted(expected_rows)
    kept = o3.Irreps([(m, ir) for m, ir in conv.irreps_out if m > 0])
    assert x.shape == (len(rows), kept.dim)

    template = without_empty_irreps(case.template, case.template)
    if len(template) == 0:
        return
    tensor = without_empty_irreps(case.tensor, case.template)
    expected, expected_rows, irreps = reference_to_irreps(
        tensor, template, basis=case.basis, layout=case.layout, row_keys=case.row_keys
    )
    assert str(kept) == irreps
    exact = case.basis == "featomic" or not x.is_floating_point()
    atol = 0.0 if exact else (1e-12 if x.dtype == torch.float64 else 1e-5)
    seen = set()
    for i, row in enumerate(expected_rows):
        r = rows.index(row)
        seen.add(r)
        error = (x[r].to(torch.float64) - expected[i]).abs().max().item() if x.shape[1] else 0.0
        assert error <= atol, (row, error)
    for r in range(len(rows)):
        if r not in seen:
            assert torch.all(x[r] == 0)


def check_inverse_fault(conv, case: Fuzz, x: torch.Tensor, samples: Labels):
    """Corrupt what the inverse is given: invalid corruptions must raise ValueError."""
    fault = case.inverse_fault
    inverse = conv.inverse()
    names = samples.names
    values = samples.values
    n = values.shape[0]
    row_keys = effective_row_keys(case.template, case.row_keys)
    valid = fault == "columns reordered"
    either = False
    if fault == "too wide":
        x = torch.cat([x, torch.zeros(n, 1, dtype=x.dtype)], dim=1)
    elif fault == "too narrow":
        if x.shape[1] == 0:
            return
        x = x[:, :-1]
    elif fault == "one-dimensional":
        x = x.reshape(-1)
    elif fault == "samples too short":
        if n == 0:
            return
        values = values[:-1]
    elif fault == "samples lack a dimension":
        names, values = names[1:], values[:, 1:]
    elif fault == "samples lack the row key":
        if not row_keys:
            return
        keep = [i for i, name in enumerate(names) if name not in row_keys]
        names, values = [names[i] for i in keep], values[:, keep]
    elif fault == "unknown row key":
        if not row_keys or n == 0:
            return
        values = values.clone()
        values[0, names.index(row_keys[0])] = 99
    elif fault == "duplicated after dropping a column":
        if n == 0:
            return
        names = names + ["extra"]
        extra = torch.zeros(n + 1, 1, dtype=torch.int32)
        extra[-1] = 1
        values = torch.cat([torch.cat([values, values[:1]]), extra], dim=1)
        x = torch.cat([x, x[:1]])
    elif fault == "duplicated samples":
        if n == 0:
            return
        values = torch.cat([values, values[:1]])
        x = torch.cat([x, x[:1]])
    elif fault == "integers":
        x = torch.round(x * 10).to(torch.int64)
        dense = case.basis == "e3nn" and any(ir.l >= 2 for _, ir in conv.irreps_out)
        either = not (dense and n > 0)
    elif fault == "columns reordered":
        names, values = names[::-1], values.flip(1)
    elif fault == "extra unique column":
        names = names + ["extra"]
        values = torch.cat([values, torch.arange(n, dtype=torch.int32).reshape(-1, 1)], dim=1)
    samples = Labels(names, values.contiguous(), assume_unique=True)

    try:
        inverse(x, samples)
    except ValueError:
        assert not valid, f"valid inverse input ({fault}) rejected"
        return
    assert valid or either, f"inverse accepted an invalid input: {fault}"
    if valid:
        check_round_trip(conv, case.template, case.tensor, case.row_keys, case.basis, x, samples)


@given(case=fuzz_cases())
@settings(
    deadline=None,
    max_examples=MAX_EXAMPLES,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_metadata(case: Fuzz):
    # what was fuzzed, for --hypothesis-show-statistics
    for fault in case.template_faults + case.template_either:
        event("template: " + fault)
    for fault in case.input_faults + case.input_either:
        event("input: " + fault)
    if case.inverse_fault is not None:
        event("inverse: " + case.inverse_fault)
    if not (case.template_faults or case.input_faults or case.inverse_fault):
        event("valid")

    template_either = bool(case.template_either)
    try:
        conv = TensorMapToIrreps(
            case.template, basis=case.basis, layout=case.layout, row_keys=case.row_keys
        )
    except ValueError as error:
        assert case.template_faults or template_either, f"valid template rejected: {error}"
        return
    assert not case.template_faults, f"invalid template accepted: {case.template_faults}"
    # the inverse is planned from the same template
    conv.inverse()

    try:
        x = conv(case.tensor)
        samples = conv.samples(case.tensor)
    except ValueError as error:
        assert case.input_faults or case.input_either, f"valid input rejected: {error}"
        return
    assert not case.input_faults, f"invalid input accepted: {case.input_faults}"

    if not x.is_floating_point():
        # integers accepted where nothing rounds: exact copies
        if template_either:
            # irreps without properties, which the reference does not know
            check_forward_empty_irreps(conv, case, x, samples)
            return
        expected, _, _ = reference_to_irreps(
            case.tensor, case.template, basis=case.basis, layout=case.layout,
            row_keys=case.row_keys,
        )
        assert torch.equal(x.to(torch.float64), expected)
        return

    if template_either:
        check_forward_empty_irreps(conv, case, x, samples)
    else:
        check_forward(conv, case.template, case.tensor, case.row_keys, case.basis, case.layout)

    if case.inverse_fault is None:
        check_round_trip(conv, case.template, case.tensor, case.row_keys, case.basis)
    else:
        check_inverse_fault(conv, case, x, samples)
