"""Synthetic TensorMaps with featomic's exact metadata and random values, of any
size (the operation-count tests and the benchmarks use them)."""

from typing import List, Sequence

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

KEY_NAMES = ["o3_lambda", "o3_sigma", "center_type", "neighbor_type"]


def featomic_like(
    n_systems: int,
    n_atoms: int,
    lmax: int,
    n_radial: int,
    types: Sequence[int] = (1, 6, 8),
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    seed: int = 0,
) -> TensorMap:
    """A spherical expansion with featomic's exact metadata and random values.

    Keys ``(o3_lambda, o3_sigma, center_type, neighbor_type)`` in featomic's order
    (center, neighbor, then lambda fastest), int32 Labels, samples ``(system, atom)``
    of the atoms of each center type, components ``o3_mu``, properties ``n``. Every
    system contains every type, so every (center, neighbor) pair has a block and the
    blocks of a center type share their samples, as featomic gives for such a batch.
    """
    g = torch.Generator().manual_seed(seed)
    types_t = torch.tensor(sorted(types), dtype=torch.int32)
    if n_atoms < len(types):
        raise ValueError("need at least one atom of every type per system")
    systems = []
    for _ in range(n_systems):
        a = types_t[torch.randint(len(types), (n_atoms,), generator=g)]
        a[: len(types)] = types_t
        systems.append(a)
    samples = {}
    for c in types_t.tolist():
        rows = []
        for s, a in enumerate(systems):
            atoms = torch.nonzero(a == c)[:, 0].to(torch.int32)
            rows.append(torch.stack([torch.full_like(atoms, s), atoms], dim=1))
        samples[c] = Labels(["system", "atom"], torch.cat(rows))
    props = Labels(["n"], torch.arange(n_radial, dtype=torch.int32).reshape(-1, 1))
    comps = [
        Labels(["o3_mu"], torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1))
        for l in range(lmax + 1)
    ]
    keys: List[List[int]] = []
    blocks: List[TensorBlock] = []
    for c in types_t.tolist():
        for nt in types_t.tolist():
            for l in range(lmax + 1):
                s = samples[c]
                v = torch.randn(len(s), 2 * l + 1, n_radial, generator=g, dtype=torch.float64)
                v = v.to(dtype).requires_grad_(requires_grad)
                keys.append([l, 1, c, nt])
                blocks.append(TensorBlock(v, s, [comps[l]], props))
    return TensorMap(Labels(KEY_NAMES, torch.tensor(keys, dtype=torch.int32)), blocks)
