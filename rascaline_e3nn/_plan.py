"""Pure index planning on metadata: which value of which block goes where.

Nothing here runs in ``forward``: :class:`Layout` is built once, from the metadata of a
template :class:`~metatensor.torch.TensorMap` (or from e3nn irreps), and the modules turn
it into flat integer tables.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from e3nn import o3
from metatensor.torch import Labels, TensorMap

from ._conventions import parity, sigma
from ._tables import check_block, describe_key

#: key dimensions that define the irrep of a block
IRREP_KEYS = ("o3_lambda", "o3_sigma")


@dataclass(frozen=True)
class BlockPlan:
    """Where one block of the layout goes."""

    key: Tuple[int, ...]  #: key values, in ``Layout.key_names`` order
    l: int
    p: int
    group: int  #: index into ``Layout.groups`` (values of the row-like key dimensions)
    properties: torch.Tensor  #: ``[n_properties, n_property_dims]`` int32
    channels: Tuple[int, ...]  #: channel of each property within its irrep


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


#: a run of consecutive channels of a segment, for one group of rows: ``(block, first
#: property, n)`` taken from a block, or ``(-1, 0, n)`` for n channels of zeros
Piece = Tuple[int, int, int]


@dataclass
class Layout:
    """The complete metadata plan shared by both adapters."""

    key_names: List[str]
    row_key_names: List[str]
    channel_key_names: List[str]
    sample_names: List[str]
    #: distinct (l, p), in e3nn order, with their channels and property names
    irreps: List[Tuple[int, int]]
    channels: Dict[Tuple[int, int], List[Tuple[int, ...]]]
    property_names: Dict[Tuple[int, int], List[str]]
    blocks: List[BlockPlan]
    #: distinct values of the row-like key dimensions, ascending
    groups: List[Tuple[int, ...]]
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

    def blocks_of(self, group: int, irrep: Tuple[int, int]) -> List[int]:
        return [
            t
            for t, b in enumerate(self.blocks)
            if b.group == group and (b.l, b.p) == irrep
        ]

    def pieces(self, group: int, segment: int) -> List[Piece]:
        """Runs of channels of ``segment`` for the rows of ``group``."""
        seg = self.segments[segment]
        source: Dict[int, Tuple[int, int]] = {}
        for t in self.blocks_of(group, (seg.l, seg.p)):
            for j, c in enumerate(self.blocks[t].channels):
                source[c] = (t, j)

        pieces: List[List[int]] = []
        for c in range(seg.channel_start, seg.channel_start + seg.mul):
            t, j = source.get(c, (-1, 0))
            if pieces:
                last = pieces[-1]
                if t == -1 and last[0] == -1:
                    last[2] += 1
                    continue
                if t != -1 and last[0] == t and last[1] + last[2] == j:
                    last[2] += 1
                    continue
            pieces.append([t, j, 1])
        return [(t, j, n) for t, j, n in pieces]

    def piece_tables(self) -> Tuple[List[int], List[int], List[int], List[int]]:
        """Every piece of every (row group, segment), flat: ``(block, start, length,
        ptr)``, the pieces of group g and segment s being
        ``ptr[g * n_segments + s] : ptr[g * n_segments + s + 1]``."""
        block: List[int] = []
        start: List[int] = []
        length: List[int] = []
        ptr = [0]
        for g in range(len(self.groups)):
            for s in range(len(self.segments)):
                for t, j, n in self.pieces(g, s):
                    block.append(t)
                    start.append(j)
                    length.append(n)
                ptr.append(len(block))
        return block, start, length, ptr

    def fused_tables(self, layout: str) -> Tuple[List[int], List[int]]:
        """Tables of the fused kernel: ``meta`` (``l``, group, start in ``columns``
        per block) and ``columns`` (first column and m step of every property of
        every block, in the block's property order)."""
        where: Dict[Tuple[int, int], Tuple[int, int]] = {}
        for g in range(len(self.groups)):
            for s in range(len(self.segments)):
                c = 0
                for t, j, n in self.pieces(g, s):
                    if t >= 0:
                        for i in range(n):
                            where[(t, j + i)] = (s, c + i)
                    c += n
        meta: List[int] = []
        columns: List[int] = []
        for t, b in enumerate(self.blocks):
            meta += [b.l, b.group, len(columns)]
            n_m = 2 * b.l + 1
            for j in range(b.properties.shape[0]):
                s, c = where[(t, j)]
                seg = self.segments[s]
                if layout == "mul_ir":
                    columns += [seg.offset + c * n_m, 1]
                else:
                    columns += [seg.offset + c, seg.mul]
        return meta, columns

    def group_keys(self) -> torch.Tensor:
        """``[n_groups, n_row_keys]`` values of the row-like key dimensions."""
        groups = torch.tensor(self.groups, dtype=torch.int32)
        return groups.reshape(len(self.groups), len(self.row_key_names))

    def keys(self) -> Labels:
        values = torch.tensor([b.key for b in self.blocks], dtype=torch.int32)
        return Labels(self.key_names, values.reshape(-1, len(self.key_names)))

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
            row_keys = [n for n in ("center_type",) if n in key_names]
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

        col = {name: i for i, name in enumerate(key_names)}
        keys = template.keys.values.to("cpu")
        sample_names: Optional[List[str]] = None
        prop_names: Dict[Tuple[int, int], List[str]] = {}
        raw = []
        for index in range(len(template.keys)):
            key = tuple(int(v) for v in keys[index])
            described = describe_key(key_names, torch.tensor(key))
            if any(r[0] == key for r in raw):
                raise ValueError(f"the template has the key {described} twice")
            block = template.block_by_id(index)
            l, s = key[col["o3_lambda"]], key[col["o3_sigma"]]
            try:
                p = parity(l, s)
            except ValueError as e:
                raise ValueError(f"block {described}: {e}") from None
            mu = torch.arange(-l, l + 1, dtype=torch.int32)
            check_block(block, l, mu, list(block.samples.names), described)
            if sample_names is None:
                sample_names = list(block.samples.names)
            elif list(block.samples.names) != sample_names:
                raise ValueError(
                    f"block {described} has samples {list(block.samples.names)}, "
                    f"other blocks have {sample_names}"
                )
            names = list(block.properties.names)
            if prop_names.setdefault((l, p), names) != names:
                raise ValueError(
                    f"block {described} has properties {names}, other blocks of the "
                    f"same (o3_lambda, o3_sigma) have {prop_names[(l, p)]}"
                )
            row = tuple(key[col[n]] for n in row_keys)
            chan = tuple(key[col[n]] for n in channel_keys)
            props = block.properties.values.to("cpu", torch.int32)
            raw.append((key, l, p, row, chan, props))
        assert sample_names is not None
        for name in row_keys:
            if name in sample_names:
                raise ValueError(
                    f"row key '{name}' is already a sample dimension {sample_names}"
                )

        irreps = sorted(prop_names)
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
            segments.append(Segment(l, p, mul, 0, offset))
            offset += mul * (2 * l + 1)
        return Layout(
            key_names=key_names,
            row_key_names=row_keys,
            channel_key_names=channel_keys,
            sample_names=sample_names,
            irreps=irreps,
            channels=channels,
            property_names=prop_names,
            blocks=blocks,
            groups=groups,
            segments=segments,
        )

    @staticmethod
    def from_irreps(
        irreps: o3.Irreps, sample_names: Sequence[str], property_name: str
    ) -> "Layout":
        """One block per distinct (l, p) of ``irreps``, duplicates merged in order."""
        irreps = o3.Irreps(irreps)
        if len(irreps) == 0 or irreps.dim == 0:
            raise ValueError(f"irreps {irreps} are empty")
        counts: Dict[Tuple[int, int], int] = {}
        segments = []
        offset = 0
        for mul, ir in irreps:
            lp = (ir.l, ir.p)
            segments.append(Segment(ir.l, ir.p, mul, counts.get(lp, 0), offset))
            counts[lp] = counts.get(lp, 0) + mul
            offset += mul * ir.dim
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
            sample_names=list(sample_names),
            irreps=order,
            channels={lp: [(i,) for i in range(counts[lp])] for lp in order},
            property_names={lp: [property_name] for lp in order},
            blocks=blocks,
            groups=[()],
            segments=segments,
        )
