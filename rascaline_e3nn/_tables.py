"""Helpers shared by both modules: flat tables, checks and sorting used in ``forward``."""

from typing import List, Tuple

import torch
from metatensor.torch import Labels, TensorBlock

from ._conventions import basis_permutation, change_of_basis


def int_list(values: torch.Tensor) -> List[int]:
    result: List[int] = values.reshape(-1).to(torch.int64).tolist()
    return result


def describe_key(names: List[str], values: torch.Tensor) -> str:
    """``(name=value, ...)`` for one entry of a Labels."""
    flat = int_list(values)
    parts: List[str] = []
    for i in range(len(names)):
        parts.append(names[i] + "=" + str(flat[i]))
    return "(" + ", ".join(parts) + ")"


def select_columns(values: torch.Tensor, columns: List[int]) -> torch.Tensor:
    """``values[:, columns]``, as a view when the columns are consecutive (indexing
    with a list would copy an index to the device first)."""
    if len(columns) > 0:
        consecutive = True
        for i in range(1, len(columns)):
            if columns[i] != columns[0] + i:
                consecutive = False
        if consecutive:
            return values.narrow(1, columns[0], len(columns))
    return values[:, columns]


def lexsort(rows: torch.Tensor) -> torch.Tensor:
    """Permutation sorting the rows of a 2-D integer tensor lexicographically."""
    perm = torch.arange(rows.shape[0], device=rows.device)
    for c in range(rows.shape[1] - 1, -1, -1):
        _, idx = torch.sort(rows[:, c].index_select(0, perm), stable=True)
        perm = perm.index_select(0, idx)
    return perm


def unique_rows(rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(rows, sorted=True, return_inverse=True, dim=0)`` with a few
    whole-tensor operators (``unique`` with ``dim`` works row by row: ~50 ms for
    the 14k sample rows of a featomic batch)."""
    n = rows.shape[0]
    if n == 0:
        return rows, torch.zeros(0, dtype=torch.int64, device=rows.device)
    order = lexsort(rows)
    ordered = rows.index_select(0, order)
    first = torch.ones(n, dtype=torch.bool, device=rows.device)
    if n > 1:
        first[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
    ids = torch.cumsum(first.to(torch.int64), dim=0) - 1
    inverse = torch.empty_like(ids)
    inverse[order] = ids
    return ordered[first], inverse


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return inv


def basis_tables(L: int):
    """``[L+1, 2L+1, 2L+1]`` change-of-basis matrices (zero padded) and the l=1
    permutation with its inverse."""
    basis = torch.zeros(L + 1, 2 * L + 1, 2 * L + 1, dtype=torch.float64)
    for l in range(L + 1):
        basis[l, : 2 * l + 1, : 2 * l + 1] = change_of_basis(l)
    perm = basis_permutation(1)
    inverse = [perm.index(i) for i in range(3)]
    return basis, torch.tensor(perm), torch.tensor(inverse)


def check_block(
    block: TensorBlock,
    l: int,
    mu: torch.Tensor,
    sample_names: List[str],
    where: str,
) -> None:
    """Validate one input block against the layout (TorchScript-compatible)."""
    components = block.components
    if len(components) != 1 or components[0].names != ["o3_mu"]:
        names: List[List[str]] = []
        for c in components:
            names.append(c.names)
        raise ValueError(
            "block " + where + " has components " + str(names)
            + ", expected [['o3_mu']]"
        )
    n_mu = 2 * l + 1
    values = components[0].values.reshape(-1)
    L = (mu.shape[0] - 1) // 2
    if values.shape[0] != n_mu or not torch.equal(
        values, mu[L - l : L + l + 1].to(values.device)
    ):
        raise ValueError(
            "block " + where + " has o3_mu components " + str(int_list(values))
            + ", expected -" + str(l) + ".." + str(l) + " in increasing order"
        )
    if block.samples.names != sample_names:
        raise ValueError(
            "block " + where + " has samples " + str(block.samples.names)
            + ", expected " + str(sample_names)
        )
    gradients = block.gradients_list()
    if len(gradients) != 0:
        raise ValueError(
            "block " + where + " has gradients " + str(gradients)
            + ": explicit gradient blocks are not converted; compute without "
            + "`gradients=` and let featomic-torch's autograd integration "
            + "propagate derivatives to positions and cell instead"
        )


def labels(names: List[str], values: torch.Tensor) -> Labels:
    return Labels(names, values.to(torch.int32))


def scatter_rows(out: torch.Tensor, position: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[position] = rows`` for whole rows.

    A scatter on a fresh tensor, so that its backward is the inverse gather (no
    ``index_add_``). Without gradients, pairs of real values move as one complex
    element where the layout allows (bit-exact: the bytes are only copied), halving
    the work of the element-wise indexing kernel.
    """
    if (
        not (torch.is_grad_enabled() and rows.requires_grad)
        and (rows.dtype == torch.float32 or rows.dtype == torch.float64)
        and rows.shape[1] % 2 == 0
        and rows.shape[0] > 0
        and rows.is_contiguous()
        and out.is_contiguous()
        and rows.storage_offset() % 2 == 0
        and out.storage_offset() % 2 == 0
    ):
        pairs = rows.shape[1] // 2
        torch.view_as_complex(out.view(out.shape[0], pairs, 2)).index_put_(
            (position,), torch.view_as_complex(rows.view(rows.shape[0], pairs, 2))
        )
        return
    out.index_put_((position,), rows)
