"""Slow, obviously-correct references for the adapters, written with Python loops
and dictionaries over every single value. Tests compare the fast modules to these."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from e3nn import o3
from metatensor.torch import Labels, TensorBlock, TensorMap

Q = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def basis_change(l: int) -> torch.Tensor:
    """x_e3nn = D @ x_featomic, computed in float64 with e3nn's D_from_matrix."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return o3.Irrep(l, 1).D_from_matrix(torch.tensor(Q))
    finally:
        torch.set_default_dtype(default)


def _keys(tensor: TensorMap) -> List[Dict[str, int]]:
    names = tensor.keys.names
    return [dict(zip(names, [int(v) for v in row])) for row in tensor.keys.values]


def reference_layout(template: TensorMap, row_keys: Optional[Sequence[str]] = None):
    names = template.keys.names
    if row_keys is None:
        defaults = ("center_type", "first_atom_type", "second_atom_type")
        row_keys = [n for n in defaults if n in names]
    channel_keys = [n for n in names if n not in ("o3_lambda", "o3_sigma", *row_keys)]
    channels: Dict[Tuple[int, int], set] = {}
    for key, block in zip(_keys(template), template.blocks()):
        l, s = key["o3_lambda"], key["o3_sigma"]
        p = s * (-1) ** l
        for prop in block.properties.values.tolist():
            chan = tuple(key[n] for n in channel_keys) + tuple(prop)
            channels.setdefault((l, p), set()).add(chan)
    irreps = sorted(channels)  # e3nn order: l, then p=-1 before p=+1
    channels = {ir: sorted(c) for ir, c in channels.items()}
    offsets = {}  # first column of each irrep
    dim = 0
    for l, p in irreps:
        offsets[(l, p)] = dim
        dim += len(channels[(l, p)]) * (2 * l + 1)
    return list(row_keys), channel_keys, irreps, channels, offsets, dim


def reference_to_irreps(
    tensor: TensorMap,
    template: TensorMap,
    *,
    basis: str = "e3nn",
    layout: str = "mul_ir",
    row_keys: Optional[Sequence[str]] = None,
):
    """Returns (values [n_rows, dim] float64, row tuples, irreps string)."""
    row_keys, channel_keys, irreps, channels, offsets, dim = reference_layout(
        template, row_keys
    )

    rows = set()
    for key, block in zip(_keys(tensor), tensor.blocks()):
        for sample in block.samples.values.tolist():
            rows.add(tuple(sample) + tuple(key[n] for n in row_keys))
    rows = sorted(rows)
    row_index = {r: i for i, r in enumerate(rows)}

    out = torch.zeros(len(rows), dim, dtype=torch.float64)
    for key, block in zip(_keys(tensor), tensor.blocks()):
        l, s = key["o3_lambda"], key["o3_sigma"]
        p = s * (-1) ** l
        mul = len(channels[(l, p)])
        D = basis_change(l)
        values = block.values.detach().to(torch.float64)
        for i, sample in enumerate(block.samples.values.tolist()):
            row = row_index[tuple(sample) + tuple(key[n] for n in row_keys)]
            for j, prop in enumerate(block.properties.values.tolist()):
                chan = channels[(l, p)].index(
                    tuple(key[n] for n in channel_keys) + tuple(prop)
                )
                vector = values[i, :, j]
                if basis == "e3nn":
                    vector = D @ vector
                for m in range(2 * l + 1):
                    if layout == "mul_ir":
                        column = offsets[(l, p)] + chan * (2 * l + 1) + m
                    else:
                        column = offsets[(l, p)] + m * mul + chan
                    out[row, column] = vector[m]
    irreps_str = "+".join(
        f"{len(channels[(l, p)])}x{l}{'e' if p == 1 else 'o'}" for l, p in irreps
    )
    return out, rows, irreps_str


def reference_to_tensor_map(
    x: torch.Tensor,
    rows: List[Tuple[int, ...]],
    template: TensorMap,
    *,
    basis: str = "e3nn",
    layout: str = "mul_ir",
    row_keys: Optional[Sequence[str]] = None,
) -> Dict[Tuple[int, ...], Dict[Tuple[int, ...], torch.Tensor]]:
    """For every template key, {sample tuple: [2l+1, n_properties] values} read back
    from x, one row at a time."""
    row_keys, channel_keys, irreps, channels, offsets, dim = reference_layout(
        template, row_keys
    )
    n_samples = len(template.sample_names)
    result = {}
    for key, block in zip(_keys(template), template.blocks()):
        l, s = key["o3_lambda"], key["o3_sigma"]
        p = s * (-1) ** l
        mul = len(channels[(l, p)])
        D = basis_change(l)
        per_sample = {}
        for r, row in enumerate(rows):
            if tuple(row[n_samples:]) != tuple(key[n] for n in row_keys):
                continue
            value = torch.zeros(2 * l + 1, len(block.properties), dtype=torch.float64)
            for j, prop in enumerate(block.properties.values.tolist()):
                chan = channels[(l, p)].index(
                    tuple(key[n] for n in channel_keys) + tuple(prop)
                )
                vector = torch.zeros(2 * l + 1, dtype=torch.float64)
                for m in range(2 * l + 1):
                    if layout == "mul_ir":
                        column = offsets[(l, p)] + chan * (2 * l + 1) + m
                    else:
                        column = offsets[(l, p)] + m * mul + chan
                    vector[m] = x[r, column]
                if basis == "e3nn":
                    vector = D.T @ vector
                value[:, j] = vector
            per_sample[tuple(row[:n_samples])] = value
        result[tuple(key.values())] = per_sample
    return result


def make_block(l: int, samples, properties, values=None, property_names=("n",)):
    """A TensorBlock with o3_mu components; random float64 values by default."""
    samples = torch.tensor(samples, dtype=torch.int32).reshape(-1, 2)
    properties = torch.tensor(properties, dtype=torch.int32).reshape(
        -1, len(property_names)
    )
    if values is None:
        values = torch.randn(len(samples), 2 * l + 1, len(properties), dtype=torch.float64)
    return TensorBlock(
        values=values,
        samples=Labels(["system", "atom"], samples),
        components=[Labels(["o3_mu"], torch.arange(-l, l + 1).reshape(-1, 1))],
        properties=Labels(list(property_names), properties),
    )


def with_grad(tensor: TensorMap):
    """A copy of ``tensor`` whose block values are new leaves requiring grad, and
    the list of those leaves."""
    leaves = [b.values.detach().clone().requires_grad_() for b in tensor.blocks()]
    blocks = [
        TensorBlock(values=v, samples=b.samples, components=b.components,
                    properties=b.properties)
        for v, b in zip(leaves, tensor.blocks())
    ]
    return TensorMap(tensor.keys, blocks), leaves
