"""``IrrepsToTensorMap``: flat e3nn tensor -> metatensor TensorMap."""

from typing import List, Optional, Sequence

import torch
from e3nn import o3
from metatensor.torch import Labels, TensorBlock, TensorMap

from ._conventions import BASES, LAYOUTS, check_option
from ._fused import fused_basis, fused_ops, may_fuse
from ._plan import Layout
from ._tables import (
    basis_tables,
    describe_key,
    int_list,
    inverse_permutation,
    labels,
    lexsort,
    select_columns,
)


class IrrepsToTensorMap(torch.nn.Module):
    r"""Convert a flat ``[n_rows, irreps_in.dim]`` e3nn tensor to a
    :py:class:`~metatensor.torch.TensorMap` with featomic's conventions: keys
    ``o3_lambda, o3_sigma`` (``o3_sigma = p * (-1) ** l``), components ``o3_mu``
    in featomic's real spherical-harmonics basis.

    Built from e3nn irreps (one block per distinct ``(l, p)``, repeated irreps
    merged in order, properties ``0..mul-1``), or as the exact inverse of a
    :py:class:`TensorMapToIrreps` through :py:meth:`from_tensor_map` /
    :py:meth:`TensorMapToIrreps.inverse`, which splits the rows back along the
    row-like key dimensions (read from the ``samples`` columns) and the channels
    along the channel-like ones.

    Parameters
    ----------
    irreps : e3nn.o3.Irreps or str
        Irreps of the input.
    basis : {"e3nn", "featomic"}
        Basis of the input; ``"e3nn"`` is rotated back to featomic's.
    layout : {"mul_ir", "ir_mul"}
        Layout of the input.
    property_name : str
        Name of the property dimension of the output blocks.
    check : bool
        Validate the input (default): duplicated rows, and, for layouts where some
        row groups lack blocks of some channels (a template from a batch missing
        type pairs), that ``x`` is zero there instead of dropping those values.
    kernel : {"auto", "fused", "torch"}
        How values move on the CPU, as for :py:class:`TensorMapToIrreps`.

    Examples
    --------
    >>> import torch
    >>> from metatensor.torch import Labels
    >>> to_tensor_map = IrrepsToTensorMap("1x1o")
    >>> to_tensor_map
    IrrepsToTensorMap(1x1o, basis=e3nn, layout=mul_ir)
    >>> x = torch.tensor([[1.0, 2.0, 3.0]])  # e3nn's (x, y, z)
    >>> samples = Labels(["system", "atom"], torch.tensor([[0, 0]]))
    >>> dipole = to_tensor_map(x, samples)
    >>> dipole.keys.names, dipole.keys.values.tolist()
    (['o3_lambda', 'o3_sigma'], [[1, 1]])
    >>> dipole.block(0).values[0, :, 0]  # featomic's (y, z, x)
    tensor([2., 3., 1.])
    """

    _sample_names: List[str]
    _row_key_names: List[str]
    _block_l: List[int]
    _block_group: List[int]
    _seg_dims: List[int]
    _seg_l: List[int]
    _seg_mul: List[int]
    _seg_p: List[int]
    _piece_block: List[int]
    _piece_len: List[int]
    _piece_ptr: List[int]
    _holes: List[List[int]]
    _block_piece_ptr: List[int]
    _block_pieces: List[int]
    _components: List[Labels]
    _properties: List[Labels]
    _fused_meta: List[int]
    _fused_columns: List[int]
    _all_blocks: List[int]
    __jit_unused_properties__ = ["_fused"]

    def __init__(
        self,
        irreps,
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
        property_name: str = "n",
        check: bool = True,
        kernel: str = "torch",
    ):
        super().__init__()
        plan = Layout.from_irreps(o3.Irreps(irreps), [], property_name)
        self._setup(plan, basis, layout, all_samples=True, check=check, kernel=kernel)

    @classmethod
    def from_tensor_map(
        cls,
        template: TensorMap,
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
        row_keys: Optional[Sequence[str]] = None,
        check: bool = True,
        kernel: str = "torch",
    ) -> "IrrepsToTensorMap":
        """The exact inverse of ``TensorMapToIrreps(template, basis=basis,
        layout=layout, row_keys=row_keys)``."""
        plan = Layout.from_tensor_map(template, row_keys)
        return cls._from_plan(plan, basis=basis, layout=layout, check=check, kernel=kernel)

    @classmethod
    def _from_plan(
        cls, plan: Layout, *, basis: str, layout: str, check: bool = True,
        kernel: str = "torch",
    ) -> "IrrepsToTensorMap":
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._setup(plan, basis, layout, all_samples=False, check=check, kernel=kernel)
        return module

    def _setup(
        self, plan: Layout, basis: str, layout: str, all_samples: bool, check: bool,
        kernel: str,
    ) -> None:
        self.basis = check_option("basis", basis, BASES)
        self.layout = check_option("layout", layout, LAYOUTS)
        self.plan = plan
        self.irreps_in = o3.Irreps([(s.mul, (s.l, s.p)) for s in plan.segments])
        self._e3nn_basis = self.basis == "e3nn"
        self._channel_dim = 1 if self.layout == "mul_ir" else 2
        self._dim = plan.dim
        self._all_samples = all_samples
        self._check = check
        self._sample_names = list(plan.sample_names)
        self._row_key_names = list(plan.row_key_names)
        self._n_blocks = len(plan.blocks)
        self._n_groups = len(plan.groups)
        self._n_segments = len(plan.segments)

        self._block_l = [b.l for b in plan.blocks]
        self._block_group = [b.group for b in plan.blocks]
        self._seg_dims = [s.dim for s in plan.segments]
        self._seg_l = [s.l for s in plan.segments]
        self._seg_mul = [s.mul for s in plan.segments]
        self._seg_p = [s.p for s in plan.segments]

        self.register_buffer("_group_keys", plan.group_keys(), persistent=False)

        piece_block, piece_start, piece_len, piece_ptr = plan.piece_tables()
        self._piece_block = piece_block
        self._piece_len = piece_len
        self._piece_ptr = piece_ptr
        # the channels no block holds, as (piece, row group, segment)
        holes: List[List[int]] = []
        for g in range(len(plan.groups)):
            for s in range(len(plan.segments)):
                i = g * len(plan.segments) + s
                for k in range(piece_ptr[i], piece_ptr[i + 1]):
                    if piece_block[k] < 0:
                        holes.append([k, g, s])
        self._holes = holes
        # the pieces of every block, in the order of its properties
        block_pieces: List[int] = []
        block_piece_ptr = [0]
        for t in range(len(plan.blocks)):
            mine = [k for k in range(len(piece_block)) if piece_block[k] == t]
            block_pieces.extend(sorted(mine, key=lambda k: piece_start[k]))
            block_piece_ptr.append(len(block_pieces))
        self._block_pieces = block_pieces
        self._block_piece_ptr = block_piece_ptr

        # Labels are not buffers: they are moved, once, to the device of the input
        self._labels_device = torch.device("cpu")
        self._keys = plan.keys()
        self._components = [
            Labels(["o3_mu"], torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1))
            for l in range(plan.max_l + 1)
        ]
        self._properties = [
            Labels(plan.property_names[(b.l, b.p)], b.properties) for b in plan.blocks
        ]

        basis_matrices, perm, inverse = basis_tables(plan.max_l)
        self.register_buffer("_basis", basis_matrices, persistent=False)
        self.register_buffer("_perm1_inverse", inverse, persistent=False)

        self.kernel = kernel
        self._ops = fused_ops(kernel)
        self._fused_meta, self._fused_columns = plan.fused_tables(self.layout)
        self._all_blocks = list(range(len(plan.blocks)))
        self._group_keys_host = plan.group_keys()

    @property
    def _fused(self) -> bool:
        """Whether this module calls the fused kernel (for CPU inputs)."""
        return self._ops is not None

    def extra_repr(self) -> str:
        return f"{self.irreps_in}, basis={self.basis}, layout={self.layout}"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"

    @torch.jit.unused
    def keys(self) -> Labels:
        """Keys of the output TensorMap."""
        return self._keys

    def _featomic_values(
        self, w: torch.Tensor, l: int, basis: torch.Tensor
    ) -> torch.Tensor:
        """Block values ``[n, 2l+1, P]`` in featomic's basis from the channel form
        (``[n, P, 2l+1]`` for mul_ir, ``[n, 2l+1, P]`` for ir_mul)."""
        m_dim = 3 - self._channel_dim
        if self._e3nn_basis and l >= 2:
            # x_featomic = D^T x_e3nn along m, as one 2-D GEMM: [2l+1, n, P]
            D = basis[l, : 2 * l + 1, : 2 * l + 1]
            return torch.tensordot(D, w, dims=([0], [m_dim])).movedim(0, 1).contiguous()
        if self._e3nn_basis and l == 1:
            w = w.index_select(m_dim, self._perm1_inverse)
        if self._channel_dim == 1:
            w = w.transpose(1, 2)
        return w.contiguous()

    def _check_holes(self, pieces: List[torch.Tensor]) -> None:
        """Entries of x in channels that no block of the layout holds for their rows
        have nowhere to go: they must be zero, or they would be dropped silently."""
        largest: List[torch.Tensor] = []
        for hole in self._holes:
            piece = pieces[hole[0]]
            if piece.numel() > 0:
                largest.append(piece.abs().amax())
        if len(largest) == 0 or not bool(torch.stack(largest).amax() > 0):
            return
        for hole in self._holes:
            piece = pieces[hole[0]]
            if piece.numel() > 0 and bool(piece.abs().amax() > 0):
                s = hole[2]
                l = self._seg_l[s]
                irrep = str(self._seg_mul[s]) + "x" + str(l)
                if self._seg_p[s] == 1:
                    irrep += "e"
                else:
                    irrep += "o"
                raise ValueError(
                    "the input has non-zero values in channels of segment " + str(s)
                    + " (" + irrep + ") for the rows with "
                    + describe_key(self._row_key_names, self._group_keys[hole[1]])
                    + ", which no block of the layout holds: they would be dropped. "
                    + "Build the module from a template (or calculator and atom_types) "
                    + "holding these blocks, or pass check=False to drop them"
                )

    def _move_labels(self, device: torch.device) -> None:
        self._keys = self._keys.to(device)
        components: List[Labels] = []
        for entry in self._components:
            components.append(entry.to(device))
        self._components = components
        properties: List[Labels] = []
        for entry in self._properties:
            properties.append(entry.to(device))
        self._properties = properties
        self._labels_device = device

    def _fused_map(self, x: torch.Tensor, samples: Labels) -> List[TensorMap]:
        """The common case, metadata included, in one call of the fused kernel (CPU,
        float32/64, labels on the CPU); anything else comes back empty."""
        return self._ops.from_irreps_map(
            x, samples, self._all_samples, self._sample_names,
            self._row_key_names, self._group_keys_host, self._keys,
            self._components, self._properties, self._block_l,
            self._block_group, fused_basis(self._e3nn_basis, self._basis),
            self._fused_meta, self._fused_columns, self._check and len(self._holes) > 0,
        )

    def _fused_forward(
        self,
        x: torch.Tensor,
        position: torch.Tensor,
        counts: List[int],
        grouped_samples: torch.Tensor,
        sample_names: List[str],
        sample_columns: List[int],
    ) -> TensorMap:
        values = self._ops.from_irreps(
            x, self._all_blocks, position, counts,
            fused_basis(self._e3nn_basis, self._basis),
            self._fused_meta, self._fused_columns,
        )
        group_labels: List[Labels] = []
        start = 0
        for g in range(self._n_groups):
            n = counts[g]
            group_values = select_columns(grouped_samples[start : start + n], sample_columns)
            group_labels.append(labels(sample_names, group_values))
            start += n
        blocks: List[TensorBlock] = []
        for t in range(self._n_blocks):
            blocks.append(
                TensorBlock(
                    values=values[t],
                    samples=group_labels[self._block_group[t]],
                    components=[self._components[self._block_l[t]]],
                    properties=self._properties[t],
                )
            )
        return TensorMap(self._keys, blocks)

    def _columns(self, names: List[str], wanted: List[str], what: str) -> List[int]:
        columns: List[int] = []
        for name in wanted:
            if name not in names:
                raise ValueError(
                    "samples " + str(names) + " lack the dimension '" + name
                    + "' (" + what + ")"
                )
            columns.append(names.index(name))
        return columns

    def forward(self, x: torch.Tensor, samples: Labels) -> TensorMap:
        if x.dim() != 2 or x.shape[1] != self._dim:
            raise ValueError(
                "expected a tensor of shape [n_rows, " + str(self._dim) + "] for irreps "
                + "of dimension " + str(self._dim) + ", got " + str(x.shape)
            )
        if self._e3nn_basis and not x.is_floating_point():
            raise ValueError(
                "the input must be floating point for the e3nn basis change, got "
                + str(x.dtype)
            )
        n_rows = x.shape[0]
        if samples.values.shape[0] != n_rows:
            raise ValueError(
                "samples have " + str(samples.values.shape[0]) + " entries for "
                + str(n_rows) + " rows of the input tensor"
            )
        device = x.device
        if self._ops is not None and device.type == "cpu" and self._n_blocks > 0 and may_fuse():
            # the common case, metadata included, in one call; anything else
            # comes back empty and takes the path below
            if device != self._labels_device:
                self._move_labels(device)
            done = self._fused_map(x, samples)
            if len(done) == 1:
                return done[0]
        names = samples.names
        sample_values = samples.values.to(device)
        if self._all_samples:
            sample_names = names
            sample_columns = list(range(len(names)))
        else:
            sample_names = self._sample_names
            sample_columns = self._columns(names, sample_names, "a sample dimension")

        # the rows of one block (sample and row-key columns) must be unique: one
        # sort and one device->host read for all blocks
        if n_rows > 1:
            used = sample_columns
            if not self._all_samples:
                for c in self._columns(names, self._row_key_names, "a key dimension moved to rows"):
                    if c not in used:
                        used = used + [c]
            key = select_columns(sample_values, used)
            key = key.index_select(0, lexsort(key))
            same = (key[1:] == key[:-1]).all(dim=1)
            if bool(same.any()):
                i = int(torch.nonzero(same)[0, 0])
                used_names: List[str] = []
                for c in used:
                    used_names.append(names[c])
                raise ValueError(
                    "samples contain " + describe_key(used_names, key[i])
                    + " more than once"
                )

        fused = (
            self._ops is not None
            and device.type == "cpu"
            and (x.dtype == torch.float32 or x.dtype == torch.float64)
            and not (self._check and len(self._holes) > 0)
            and may_fuse()
        )
        # the flat row of every grouped row (fused kernel only)
        position = torch.zeros(0, dtype=torch.int64)
        if self._n_groups == 1 and len(self._row_key_names) == 0:
            grouped_x = x
            grouped_samples = sample_values
            counts: List[int] = [n_rows]
            if fused:
                position = torch.arange(n_rows, dtype=torch.int64)
        else:
            row_columns = self._columns(
                names, self._row_key_names, "a key dimension moved to rows"
            )
            row_keys = select_columns(sample_values, row_columns)
            group_keys = self._group_keys.to(device)
            equal = (row_keys.unsqueeze(1) == group_keys.unsqueeze(0)).all(dim=2)
            found = equal.any(dim=1)
            # rows per group and rows of no group: one device->host read for both
            group = equal.to(torch.int32).argmax(dim=1)
            counts = int_list(
                torch.cat([equal.sum(dim=0), (~found).sum().reshape(1)])
            )
            if counts[self._n_groups] != 0:
                missing = int(torch.nonzero(~found)[0, 0])
                raise ValueError(
                    "row " + describe_key(names, sample_values[missing])
                    + " has " + describe_key(self._row_key_names, row_keys[missing])
                    + ", which is not in the layout"
                )
            counts = counts[: self._n_groups]
            _, order = torch.sort(group, stable=True)
            grouped_samples = sample_values.index_select(0, order)
            if fused:
                grouped_x = x
                position = order
            else:
                # a scatter on a fresh tensor: its backward is the inverse gather
                grouped_x = torch.empty_like(x)
                grouped_x.index_copy_(0, inverse_permutation(order), x)

        if device != self._labels_device:
            self._move_labels(device)
        # (the None check first: TorchScript then skips this for kernel="torch")
        if self._ops is not None and fused:
            return self._fused_forward(x, position, counts, grouped_samples, sample_names, sample_columns)

        basis = self._basis.to(dtype=x.dtype, device=device)
        cd = self._channel_dim
        pieces: List[torch.Tensor] = []
        group_labels: List[Labels] = []
        start = 0
        group_x = torch.split(grouped_x, counts, dim=0)
        for g in range(self._n_groups):
            n = counts[g]
            group_values = select_columns(grouped_samples[start : start + n], sample_columns)
            group_labels.append(labels(sample_names, group_values))
            start += n
            segments = torch.split(group_x[g], self._seg_dims, dim=1)
            for s in range(self._n_segments):
                l = self._seg_l[s]
                if cd == 1:
                    view = segments[s].reshape(n, self._seg_mul[s], 2 * l + 1)
                else:
                    view = segments[s].reshape(n, 2 * l + 1, self._seg_mul[s])
                k0 = self._piece_ptr[g * self._n_segments + s]
                k1 = self._piece_ptr[g * self._n_segments + s + 1]
                pieces.extend(torch.split(view, self._piece_len[k0:k1], dim=cd))

        if self._check and len(self._holes) > 0:
            self._check_holes(pieces)

        blocks: List[TensorBlock] = []
        for t in range(self._n_blocks):
            parts: List[torch.Tensor] = []
            for i in range(self._block_piece_ptr[t], self._block_piece_ptr[t + 1]):
                parts.append(pieces[self._block_pieces[i]])
            l = self._block_l[t]
            if len(parts) == 0:  # a block without properties
                n = counts[self._block_group[t]]
                if cd == 1:
                    w = torch.zeros((n, 0, 2 * l + 1), dtype=x.dtype, device=device)
                else:
                    w = torch.zeros((n, 2 * l + 1, 0), dtype=x.dtype, device=device)
            elif len(parts) == 1:
                w = parts[0]
            else:
                w = torch.cat(parts, dim=cd)
            blocks.append(
                TensorBlock(
                    values=self._featomic_values(w, l, basis),
                    samples=group_labels[self._block_group[t]],
                    components=[self._components[l]],
                    properties=self._properties[t],
                )
            )
        return TensorMap(self._keys, blocks)
