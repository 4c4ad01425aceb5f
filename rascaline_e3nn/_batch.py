"""What both adapters do with the metadata of a batch, and the basis change.

These functions are TorchScript-compatible: the metadata steps of both modules are
compiled once (``torch.jit.script``) so that reading dozens of blocks costs the same
in eager code as in a scripted export. ``rotate`` is the only one used on the data
path; it is pure tensor code.
"""

from typing import List, Tuple

import torch


def describe(names: List[str], values: List[int]) -> str:
    """``(name=value, ...)`` for one entry of a Labels."""
    parts: List[str] = []
    for i in range(len(names)):
        parts.append(names[i] + "=" + str(values[i]))
    return "(" + ", ".join(parts) + ")"


def int_list(values: torch.Tensor) -> List[int]:
    """The values of an integer tensor, read on the host (error messages only)."""
    result: List[int] = values.reshape(-1).to("cpu", torch.int64).tolist()
    return result


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.int64`` and so on (TorchScript's ``str`` of a dtype is its number)."""
    known = [
        (torch.float16, "torch.float16"), (torch.bfloat16, "torch.bfloat16"),
        (torch.float32, "torch.float32"), (torch.float64, "torch.float64"),
        (torch.uint8, "torch.uint8"), (torch.int8, "torch.int8"),
        (torch.int16, "torch.int16"), (torch.int32, "torch.int32"),
        (torch.int64, "torch.int64"), (torch.bool, "torch.bool"),
        (torch.complex64, "torch.complex64"), (torch.complex128, "torch.complex128"),
    ]
    for candidate, name in known:
        if dtype == candidate:
            return name
    return str(dtype)


def host_read(values: torch.Tensor) -> List[int]:
    """The values of a 1-D int64 tensor, read on the host: every read of the
    metadata steps outside error messages goes through here (a device sync each on a
    GPU). Marked ``rascaline_e3nn::host_read`` for ``torch.profiler``, which does not
    see ``.tolist()`` on the CPU, so that tests count the reads."""
    with torch.autograd.profiler.record_function("rascaline_e3nn::host_read"):
        result: List[int] = values.tolist()
    return result


def entry(values: torch.Tensor, i: int) -> List[int]:
    """Entry ``i`` of a 2-D integer tensor, read on the host (error messages only)."""
    return int_list(values[i])


def call_scripted(method, *args):
    """Call a TorchScript method from eager code, raising its ``ValueError`` as one
    (TorchScript wraps it in a ``torch.jit.Error``). Python only."""
    try:
        return method(*args)
    except torch.jit.Error as error:
        message = str(error)
        marker = "builtins.ValueError: "
        if marker in message:
            raise ValueError(message[message.rindex(marker) + len(marker) :].strip()) from None
        raise


def lexsort(rows: torch.Tensor) -> torch.Tensor:
    """Permutation sorting the rows of a 2-D integer tensor lexicographically (one
    stable sort per column, no host read)."""
    n_columns = rows.shape[1]
    order = torch.argsort(rows[:, n_columns - 1], stable=True)
    for c in range(n_columns - 2, -1, -1):
        column = rows[:, c].index_select(0, order)
        order = order.index_select(0, torch.argsort(column, stable=True))
    return order


def sorted_runs(
    rows: torch.Tensor, n_compared: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the rows of a 2-D integer tensor lexicographically (all columns) and split
    them in runs equal in their first ``n_compared`` columns: ``(order, ordered rows,
    new, ids)``, ``new`` marking the first row of each run in the sorted order and
    ``ids[i]`` the run of input row ``i``. The distinct rows are ``ordered[new]``. No
    host read."""
    order = lexsort(rows)
    ordered = rows.index_select(0, order)
    new = torch.ones(ordered.shape[0], dtype=torch.bool, device=rows.device)
    new[1:] = (ordered[1:, :n_compared] != ordered[:-1, :n_compared]).any(dim=1)
    ids = torch.empty(ordered.shape[0], dtype=torch.int64, device=rows.device).index_put_(
        (order,), torch.cumsum(new, dim=0) - 1
    )
    return order, ordered, new, ids


def join(source: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``target``, the index of the equal row of ``source`` (-1 when
    there is none), and for every row of ``source``, how many rows of ``target``
    equal it. Rows of ``source`` must be distinct. No host read."""
    n_source = source.shape[0]
    n_target = target.shape[0]
    device = source.device
    both = torch.cat([source, target.to(source.dtype)])
    if both.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    # sort by the row, sources before targets among equal rows
    tag = torch.cat(
        [
            torch.zeros(n_source, dtype=both.dtype, device=device),
            torch.ones(n_target, dtype=both.dtype, device=device),
        ]
    )
    _, _, _, ids_of = sorted_runs(torch.cat([both, tag.unsqueeze(1)], dim=1), both.shape[1])
    source_ids = ids_of[:n_source]
    target_ids = ids_of[n_source:]
    n_ids = both.shape[0]
    first_source = torch.full((n_ids,), -1, dtype=torch.int64, device=device)
    first_source.index_put_((source_ids,), torch.arange(n_source, device=device))
    matched = first_source.index_select(0, target_ids)
    uses = torch.zeros(n_ids, dtype=torch.int64, device=device)
    uses.index_put_((target_ids,), torch.ones_like(target_ids), accumulate=True)
    return matched, uses.index_select(0, source_ids)


def rotate(
    x: torch.Tensor,
    basis: torch.Tensor,
    rotations: List[List[int]],
    mul_ir: bool,
    inverse: bool,
) -> torch.Tensor:
    """Apply the dense l >= 2 changes of basis of a flat tensor, one matmul per l.

    ``basis`` holds the float64 matrices ``D_l`` flattened one after the other;
    ``rotations`` lists ``[l, mul, offset, start in basis]`` for every l >= 2 segment.
    ``inverse`` applies ``D_l^T`` (e3nn to featomic)."""
    if len(rotations) == 0:
        return x
    matrices = basis if basis.dtype == x.dtype else basis.to(x.dtype)
    n_rows = x.shape[0]
    pieces: List[torch.Tensor] = []
    last = 0
    for r in rotations:
        l, mul, offset, start = r[0], r[1], r[2], r[3]
        n_m = 2 * l + 1
        D = matrices[start : start + n_m * n_m].view(n_m, n_m)
        if inverse:
            D = D.t()
        if offset > last:
            pieces.append(x[:, last:offset])
        # one copy of the segment as [n_rows * mul, 2l+1] (rows (row, channel), m
        # fastest), then one 2-D GEMM: the same product for both layouts, so that
        # they agree bitwise (a matmul of the strided [n_rows, mul, 2l+1] view would
        # run n_rows tiny batched products)
        segment = x[:, offset : offset + mul * n_m]
        if mul_ir:
            y = torch.mm(segment.reshape(n_rows * mul, n_m), D.t())
        else:
            flat = segment.reshape(n_rows, n_m, mul).transpose(1, 2).reshape(n_rows * mul, n_m)
            y = torch.mm(flat, D.t()).view(n_rows, mul, n_m).transpose(1, 2)
        pieces.append(y.reshape(n_rows, mul * n_m))
        last = offset + mul * n_m
    if last < x.shape[1]:
        pieces.append(x[:, last:])
    return torch.cat(pieces, dim=1)


def basis_tables(segments: List[Tuple[int, int, int]]) -> Tuple[torch.Tensor, List[List[int]]]:
    """The float64 matrices of the l >= 2 segments ``(l, mul, offset)``, flattened,
    and the ``rotations`` table of :func:`rotate` (plain Python, at construction)."""
    from ._conventions import change_of_basis

    matrices: List[torch.Tensor] = []
    start_of = {}
    rotations: List[List[int]] = []
    start = 0
    for l, mul, offset in segments:
        if l < 2:
            continue
        if l not in start_of:
            start_of[l] = start
            matrices.append(change_of_basis(l).reshape(-1))
            start += (2 * l + 1) ** 2
        rotations.append([l, mul, offset, start_of[l]])
    if len(matrices) == 0:
        return torch.zeros(0, dtype=torch.float64), rotations
    return torch.cat(matrices), rotations
