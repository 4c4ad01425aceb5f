"""Pure planning on metadata: which value of which block goes to which column.

Nothing here runs in ``forward``. :class:`Layout` is built once, from the metadata of
a template :class:`~metatensor.torch.TensorMap` (or from e3nn irreps), and
:meth:`Layout.column_map` turns it into the one table both adapters read: for every
row group, where each output column comes from in the group's blocks placed side by
side.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from e3nn import o3
from metatensor.torch import Labels, TensorMap

from ._conventions import basis_permutation, parity, sigma

#: key dimensions that define the irrep of a block
IRREP_KEYS = ("o3_lambda", "o3_sigma")
#: key dimensions moved to rows by default, when the template has them: atom-centred
#: expansions have ``center_type``, pair expansions ``first_atom_type`` and
#: ``second_atom_type``
DEFAULT_ROW_KEYS = ("center_type", "first_atom_type", "second_atom_type")


@dataclass(frozen=True)
class BlockPlan:
    """Where one block of the layout goes."""

    key: Tuple[int, ...]  #: key values, in ``Layout.key_names`` order
    l: int
    p: int
    group: int  #: index into ``Layout.groups`` (values of the row-like key dimensions)
    properties: torch.Tensor  #: ``[n_properties, n_property_dims]`` int32
    channels: Tuple[int, ...]  #: channel of each property within its irrep

    @property
    def width(self) -> int:
        """Number of values of one sample: ``(2l+1) * n_properties``."""
        return (2 * self.l + 1) * self.properties.shape[0]


@dataclass(frozen=True)
class Segment:
    """One ``mul x (l, p)`` entry of the flat e3nn tensor."""

    l: int
    p: int
    mul: int
    channel_start: int  #: first channel of the (l, p) irrep held by this segment
    offset: int  #: first column in the flat tensor

    @property
    def dim(self) -> int:
        return self.mul * (2 * self.l + 1)


@dataclass
class Layout:
    """The complete metadata plan shared by both adapters."""

    key_names: List[str]
    row_key_names: List[str]
    channel_key_names: List[str]
    sample_names: List[str]
    property_names: List[str]
    #: distinct (l, p), in e3nn order, with their channels
    irreps: List[Tuple[int, int]]
    channels: Dict[Tuple[int, int], List[Tuple[int, ...]]]
    blocks: List[BlockPlan]
    #: distinct values of the row-like key dimensions, ascending
    groups: List[Tuple[int, ...]]
    #: the ``mul x (l, p)`` entries of the flat tensor, without empty ones
    segments: List[Segment]

    @property
    def dim(self) -> int:
        return sum(s.dim for s in self.segments)

    @property
    def irreps_e3nn(self) -> o3.Irreps:
        return o3.Irreps([(s.mul, (s.l, s.p)) for s in self.segments])

    @property
    def max_l(self) -> int:
        return max((l for l, _ in self.irreps), default=0)

    def group_blocks(self, group: int) -> List[int]:
        """The blocks of a row group, in template order: the order in which their
        values are placed side by side."""
        return [t for t, b in enumerate(self.blocks) if b.group == group]

    def offsets(self) -> Tuple[List[int], List[int]]:
        """Where every block starts among its group's blocks side by side (the order
        of :meth:`group_blocks`), and the width of each group's blocks together."""
        starts = [0] * len(self.blocks)
        widths = []
        for g in range(len(self.groups)):
            start = 0
            for t in self.group_blocks(g):
                starts[t] = start
                start += self.blocks[t].width
            widths.append(start)
        return starts, widths

    def keys(self) -> Labels:
        values = torch.tensor([b.key for b in self.blocks], dtype=torch.int32)
        return Labels(self.key_names, values.reshape(-1, len(self.key_names)))

    def column_map(self, basis: str, layout: str) -> torch.Tensor:
        """``[n_groups, dim]`` int64: for each row group and output column, the column
        of the group's blocks placed side by side (each block's values
        ``[n, 2l+1, n_properties]`` flattened to ``[n, width]``, in the order of
        :meth:`group_blocks`) holding its value, or the group's total width (a zero
        column appended after the blocks) for channels no block of the group holds.

        The m order is featomic's for every l except l = 1 with ``basis="e3nn"``,
        where e3nn's order is a permutation of featomic's and is folded in here; the
        dense l >= 2 change of basis is applied to the gathered columns."""
        table = torch.empty((len(self.groups), self.dim), dtype=torch.int64)
        starts, widths = self.offsets()
        for g in range(len(self.groups)):
            where: Dict[Tuple[int, int, int], Tuple[int, int]] = {}  # (l, p, channel) -> (t, j)
            for t in self.group_blocks(g):
                b = self.blocks[t]
                for j, c in enumerate(b.channels):
                    where[(b.l, b.p, c)] = t, j
            zero = widths[g]
            for s in self.segments:
                n_m = 2 * s.l + 1
                if basis == "e3nn" and s.l == 1:
                    m_source = basis_permutation(1)
                else:
                    m_source = list(range(n_m))
                for c in range(s.mul):
                    found = where.get((s.l, s.p, s.channel_start + c))
                    for m in range(n_m):
                        if layout == "mul_ir":
                            column = s.offset + c * n_m + m
                        else:
                            column = s.offset + m * s.mul + c
                        if found is None:
                            table[g, column] = zero
                        else:
                            t, j = found
                            n_properties = self.blocks[t].properties.shape[0]
                            table[g, column] = starts[t] + m_source[m] * n_properties + j
        return table

    # ------------------------------------------------------------------ builders

    @staticmethod
    def from_tensor_map(
        template: TensorMap, row_keys: Optional[Sequence[str]] = None
    ) -> "Layout":
        key_names = list(template.keys.names)
        for name in IRREP_KEYS:
            if name not in key_names:
                raise ValueError(
                    f"the template's keys {key_names} lack '{name}': a block's irrep "
                    "is read from the 'o3_lambda' and 'o3_sigma' key dimensions"
                )
        if row_keys is None:
            row_keys = [n for n in DEFAULT_ROW_KEYS if n in key_names]
        row_keys = list(row_keys)
        for name in row_keys:
            if name not in key_names or name in IRREP_KEYS:
                raise ValueError(
                    f"row key '{name}' is not one of the template's key dimensions "
                    f"{[n for n in key_names if n not in IRREP_KEYS]}"
                )
        if len(set(row_keys)) != len(row_keys):
            raise ValueError(f"row keys {row_keys} contain duplicates")
        channel_keys = [n for n in key_names if n not in IRREP_KEYS and n not in row_keys]
        if len(template.keys) == 0:
            raise ValueError("the template TensorMap has no blocks")
        sample_names = list(template.sample_names)
        for name in row_keys:
            if name in sample_names:
                raise ValueError(
                    f"row key '{name}' is already a sample dimension {sample_names}"
                )
        if template.component_names != ["o3_mu"]:
            raise ValueError(
                f"the template's blocks have components {template.component_names}, "
                "expected ['o3_mu']"
            )

        col = {name: i for i, name in enumerate(key_names)}
        keys = template.keys.values.to("cpu")
        raw = []
        for index in range(len(template.keys)):
            key = tuple(int(v) for v in keys[index])
            block = template.block_by_id(index)
            l, s = key[col["o3_lambda"]], key[col["o3_sigma"]]
            described = ", ".join(f"{n}={v}" for n, v in zip(key_names, key))
            if any(r[0] == key for r in raw):  # keys built with assume_unique=True
                raise ValueError(f"the template has the key ({described}) twice")
            try:
                p = parity(l, s)
            except ValueError as e:
                raise ValueError(f"block ({described}): {e}") from None
            if len(block.gradients_list()) != 0:
                raise ValueError(
                    f"block ({described}) has gradients {block.gradients_list()}: "
                    "explicit gradient blocks are not converted; compute without "
                    "`gradients=` and let featomic-torch's autograd integration "
                    "propagate derivatives to positions and cell instead"
                )
            mu = block.components[0].values.reshape(-1).to("cpu")
            if not torch.equal(mu, torch.arange(-l, l + 1, dtype=mu.dtype)):
                raise ValueError(
                    f"block ({described}) has o3_mu components {mu.tolist()}, expected "
                    f"-{l}..{l} in increasing order"
                )
            row = tuple(key[col[n]] for n in row_keys)
            chan = tuple(key[col[n]] for n in channel_keys)
            props = block.properties.values.to("cpu", torch.int32)
            raw.append((key, l, p, row, chan, props))

        irreps = sorted({(l, p) for _, l, p, _, _, _ in raw})
        channels: Dict[Tuple[int, int], List[Tuple[int, ...]]] = {}
        for ir in irreps:
            entries = set()
            for _, l, p, _, chan, props in raw:
                if (l, p) == ir:
                    entries.update(chan + tuple(int(v) for v in pr) for pr in props)
            channels[ir] = sorted(entries)
        groups = sorted({r[3] for r in raw})
        index_of = {ir: {c: i for i, c in enumerate(channels[ir])} for ir in irreps}

        blocks = []
        for key, l, p, row, chan, props in raw:
            where = index_of[(l, p)]
            blocks.append(
                BlockPlan(
                    key=key,
                    l=l,
                    p=p,
                    group=groups.index(row),
                    properties=props,
                    channels=tuple(where[chan + tuple(int(v) for v in pr)] for pr in props),
                )
            )
        segments = []
        offset = 0
        for l, p in irreps:
            mul = len(channels[(l, p)])
            if mul == 0:  # blocks without properties: nothing to hold
                continue
            segments.append(Segment(l, p, mul, 0, offset))
            offset += mul * (2 * l + 1)
        return Layout(
            key_names=key_names,
            row_key_names=row_keys,
            channel_key_names=channel_keys,
            sample_names=sample_names,
            property_names=list(template.property_names),
            irreps=irreps,
            channels=channels,
            blocks=blocks,
            groups=groups,
            segments=segments,
        )

    @staticmethod
    def from_irreps(irreps: o3.Irreps, property_name: str) -> "Layout":
        """One block per distinct (l, p) of ``irreps``, repeated irreps merged in
        order; no row groups, samples given by the caller."""
        irreps = o3.Irreps(irreps)
        counts: Dict[Tuple[int, int], int] = {}
        segments = []
        offset = 0
        for mul, ir in irreps:
            if mul == 0:
                continue
            lp = (ir.l, ir.p)
            segments.append(Segment(ir.l, ir.p, mul, counts.get(lp, 0), offset))
            counts[lp] = counts.get(lp, 0) + mul
            offset += mul * ir.dim
        if len(segments) == 0:
            raise ValueError(f"irreps {irreps} are empty")
        order = sorted(counts)
        blocks = [
            BlockPlan(
                key=(l, sigma(l, p)),
                l=l,
                p=p,
                group=0,
                properties=torch.arange(counts[(l, p)], dtype=torch.int32).reshape(-1, 1),
                channels=tuple(range(counts[(l, p)])),
            )
            for l, p in order
        ]
        return Layout(
            key_names=list(IRREP_KEYS),
            row_key_names=[],
            channel_key_names=[],
            sample_names=[],
            property_names=[property_name],
            irreps=order,
            channels={lp: [(i,) for i in range(counts[lp])] for lp in order},
            blocks=blocks,
            groups=[()],
            segments=segments,
        )
