"""``IrrepsToTensorMap``: flat e3nn tensor -> metatensor TensorMap."""

from typing import List, Optional, Sequence, Tuple

import torch
from e3nn import o3
from metatensor.torch import Labels, TensorBlock, TensorMap

from ._batch import (
    basis_tables,
    call_scripted,
    describe,
    dtype_name,
    entry,
    host_read,
    lexsort,
    rotate,
)
from ._conventions import BASES, LAYOUTS, check_option
from ._layout import Layout


class _WriteTensorMap(torch.nn.Module):
    """The metadata steps of :class:`IrrepsToTensorMap`, compiled with TorchScript:
    which rows go to which row group (with the checks of the input, in one host
    read), then the output ``TensorMap`` around views of the moved values."""

    _sample_names: List[str]
    _row_key_names: List[str]
    _group_slots: List[List[int]]
    _slot_l: List[int]
    _slot_group: List[int]
    _slot_start: List[int]
    _slot_width: List[int]
    _slot_n_properties: List[int]
    _labels: TensorMap
    _group_keys: torch.Tensor
    _holes: torch.Tensor

    def __init__(self, plan: Layout, columns: torch.Tensor, all_samples: bool, check: bool):
        super().__init__()
        # tables and Labels are plain attributes (out of ``state_dict``, out of reach
        # of casts); they follow the empty device marker, which ``.to()`` moves, at
        # the next call (``_follow_device``)
        self.register_buffer("_device", torch.zeros(0, dtype=torch.int32))
        self._check = check
        self._all_samples = all_samples
        self._dim = plan.dim
        self._sample_names = list(plan.sample_names)
        self._row_key_names = list(plan.row_key_names)
        self._group_slots = [plan.group_blocks(g) for g in range(len(plan.groups))]
        self._slot_l = [b.l for b in plan.blocks]
        self._slot_group = [b.group for b in plan.blocks]
        self._slot_width = [b.width for b in plan.blocks]
        self._slot_n_properties = [b.properties.shape[0] for b in plan.blocks]
        starts, widths = plan.offsets()
        self._slot_start = starts
        groups = torch.tensor(plan.groups, dtype=torch.int32)
        self._group_keys = groups.reshape(len(plan.groups), -1)
        # channels that no block of a group holds: the input must be zero there
        holes = torch.stack([columns[g] == widths[g] for g in range(len(plan.groups))])
        self._has_holes = bool(holes.any())
        self._holes = holes
        # the output's keys, components and properties, held as one empty TensorMap
        # (a list of Labels would make torch.jit.freeze fail)
        components = [
            Labels(["o3_mu"], torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1))
            for l in range(plan.max_l + 1)
        ]
        no_samples = Labels(["_"], torch.zeros((0, 1), dtype=torch.int32))
        self._labels = TensorMap(
            plan.keys(),
            [
                TensorBlock(
                    values=torch.zeros((0, 2 * b.l + 1, b.properties.shape[0])),
                    samples=no_samples,
                    components=[components[b.l]],
                    properties=Labels(plan.property_names, b.properties),
                )
                for b in plan.blocks
            ],
        )

    def _follow_device(self) -> None:
        """Move the tables and Labels to the device marker's device (after ``.to()``;
        once)."""
        device = self._device.device
        if self._holes.device != device:
            self._group_keys = self._group_keys.to(device)
            self._holes = self._holes.to(device)
            self._labels = self._labels.to(device)

    def _columns(self, names: List[str], wanted: List[str], what: str) -> List[int]:
        columns: List[int] = []
        for name in wanted:
            if name not in names:
                raise ValueError(
                    "samples " + str(names) + " lack the dimension '" + name + "' ("
                    + what + ")"
                )
            columns.append(names.index(name))
        return columns

    @torch.jit.export
    def group(
        self, x: torch.Tensor, samples: Labels
    ) -> Tuple[torch.Tensor, List[int], torch.Tensor, List[str]]:
        """The rows of every group (as an order of the input rows), the number of rows
        per group, the grouped sample values of the output blocks and their names."""
        if x.dim() != 2 or x.shape[1] != self._dim:
            raise ValueError(
                "expected a tensor of shape [n_rows, " + str(self._dim) + "], got "
                + str(x.shape)
            )
        if x.device != self._device.device:
            raise ValueError(
                "the input is on " + str(x.device) + ", the module on "
                + str(self._device.device) + ": move the module with .to()"
            )
        self._follow_device()
        n_rows = x.shape[0]
        if samples.values.device != x.device:
            raise ValueError(
                "the samples are on " + str(samples.values.device) + ", the input on "
                + str(x.device) + ": move them with samples.to(device)"
            )
        if samples.values.shape[0] != n_rows:
            raise ValueError(
                "samples have " + str(samples.values.shape[0]) + " entries for "
                + str(n_rows) + " rows of the input tensor"
            )
        names = samples.names
        values = samples.values
        if self._all_samples:
            sample_names = names
            selected = values
        else:
            # the columns TensorMapToIrreps.samples gives, as forward's `rows` takes
            for name in names:
                if name not in self._sample_names and name not in self._row_key_names:
                    raise ValueError(
                        "samples have the dimension '" + name + "', which is neither "
                        + "a sample dimension " + str(self._sample_names)
                        + " nor a row key " + str(self._row_key_names)
                    )
            sample_names = self._sample_names
            selected = values[:, self._columns(names, sample_names, "a sample dimension")]
        flags: List[torch.Tensor] = []
        used = len(sample_names)
        known = torch.ones(n_rows, dtype=torch.bool, device=x.device)
        keys = values
        if len(self._row_key_names) == 0:
            order = torch.arange(n_rows, device=x.device)
            gid = torch.zeros(n_rows, dtype=torch.int64, device=x.device)
        else:
            key_columns = self._columns(names, self._row_key_names, "a key moved to rows")
            used += len(key_columns)
            keys = values[:, key_columns]
            equal = (keys.unsqueeze(1) == self._group_keys.unsqueeze(0)).all(dim=2)
            gid = equal.to(torch.int64).argmax(dim=1)
            known = equal.any(dim=1)
            flags.append(torch.bincount(gid, minlength=len(self._group_slots)))
            flags.append((~known).sum().reshape(1))
            order = torch.argsort(gid, stable=True)
        duplicates = (used < len(names) or self._check) and n_rows > 1
        if duplicates:
            # Labels(..., assume_unique=True), or dropped columns, can repeat a row
            rows = torch.cat([selected, gid.to(selected.dtype).unsqueeze(1)], dim=1)
            ordered = rows.index_select(0, lexsort(rows))
            flags.append(((ordered[1:] == ordered[:-1]).all(dim=1)).sum().reshape(1))
        if self._check and self._has_holes:
            bad = (x != 0) & self._holes.index_select(0, gid)
            flags.append(bad.any().to(torch.int64).reshape(1))
        counts: List[int] = [n_rows]
        if len(flags) > 0:
            # the one host read: rows per group and the verdict of every check
            read = host_read(torch.cat(flags))
            n_groups = len(self._group_slots)
            at = 0
            if len(self._row_key_names) != 0:
                counts = read[:n_groups]
                at = n_groups
                if read[at] != 0:
                    i = int(torch.nonzero(~known)[0, 0])
                    raise ValueError(
                        "row " + describe(names, entry(values, i)) + " has "
                        + describe(self._row_key_names, entry(keys, i))
                        + ", which is not in the layout"
                    )
                at += 1
            if duplicates:
                if read[at] != 0:
                    raise ValueError(
                        "samples contain the same " + str(sample_names) + " twice in "
                        + "one row group: the output blocks would have duplicated samples"
                    )
                at += 1
            if self._check and self._has_holes and read[at] != 0:
                self._explain_holes(x, gid)
        return order, counts, selected.index_select(0, order), sample_names

    def _explain_holes(self, x: torch.Tensor, gid: torch.Tensor) -> None:
        bad = (x != 0) & self._holes.index_select(0, gid)
        where = torch.nonzero(bad)[0]
        row = int(where[0])
        g = int(gid[row])
        raise ValueError(
            "the input has a non-zero value (" + str(float(x[row, int(where[1])]))
            + ") in column " + str(int(where[1])) + " of row " + str(row) + ", a channel "
            + "that no block of the layout holds for the rows with "
            + describe(self._row_key_names, entry(self._group_keys, g))
            + ": it would be dropped. Build the module from a template (or calculator "
            + "and atom_types) holding these blocks, or pass check=False to drop it"
        )

    @torch.jit.export
    def write(
        self,
        parts: List[torch.Tensor],
        samples: torch.Tensor,
        counts: List[int],
        sample_names: List[str],
    ) -> TensorMap:
        """The output ``TensorMap``: every block a view of its group's part."""
        self._follow_device()
        group_labels: List[Labels] = []
        start = 0
        for g in range(len(counts)):
            group_labels.append(
                Labels(sample_names, samples[start : start + counts[g]], assume_unique=True)
            )
            start += counts[g]
        blocks: List[TensorBlock] = []
        for t in range(len(self._slot_l)):
            g = self._slot_group[t]
            l = self._slot_l[t]
            part = parts[g]
            values = part[:, self._slot_start[t] : self._slot_start[t] + self._slot_width[t]]
            labels = self._labels.block_by_id(t)
            blocks.append(
                TensorBlock(
                    values=values.reshape(part.shape[0], 2 * l + 1, self._slot_n_properties[t]),
                    samples=group_labels[g],
                    components=labels.components,
                    properties=labels.properties,
                )
            )
        return TensorMap(self._labels.keys, blocks)


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
    along the channel-like ones. The values move with the same tables as the forward
    conversion, read backwards: one GEMM per l >= 2 segment, one row
    ``index_select``, one ``gather`` per row group; every block is a view. The
    metadata step reads the host at most once (the rows of each group and the
    verdict of the checks).

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
        For layouts where some row groups lack blocks of some channels (a template
        from a batch missing type pairs), check that ``x`` is zero there (NaN
        included) instead of dropping those values (default).

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

    _rotations: List[List[int]]
    _inverse_start: List[int]
    _inverse: torch.Tensor
    _basis: torch.Tensor

    def __init__(
        self,
        irreps,
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
        property_name: str = "n",
        check: bool = True,
    ):
        super().__init__()
        plan = Layout.from_irreps(o3.Irreps(irreps), property_name)
        self._setup(plan, basis, layout, all_samples=True, check=check)

    @classmethod
    def from_tensor_map(
        cls,
        template: TensorMap,
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
        row_keys: Optional[Sequence[str]] = None,
        check: bool = True,
    ) -> "IrrepsToTensorMap":
        """The exact inverse of ``TensorMapToIrreps(template, basis=basis,
        layout=layout, row_keys=row_keys)``."""
        plan = Layout.from_tensor_map(template, row_keys)
        return cls._from_plan(plan, basis=basis, layout=layout, check=check)

    @classmethod
    def _from_plan(
        cls, plan: Layout, *, basis: str, layout: str, check: bool = True
    ) -> "IrrepsToTensorMap":
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._setup(plan, basis, layout, all_samples=False, check=check)
        return module

    def _setup(
        self, plan: Layout, basis: str, layout: str, all_samples: bool, check: bool
    ) -> None:
        self.basis = check_option("basis", basis, BASES)
        self.layout = check_option("layout", layout, LAYOUTS)
        self.plan = plan
        self.check = check
        self.irreps_in = plan.irreps_e3nn
        self._e3nn_basis = self.basis == "e3nn"
        self._mul_ir = self.layout == "mul_ir"
        columns = plan.column_map(self.basis, self.layout)
        # the forward column map read backwards: for every value of a group's blocks
        # side by side, the output column holding it
        inverse: List[torch.Tensor] = []
        starts = [0]
        _, widths = plan.offsets()
        for g in range(len(plan.groups)):
            width = widths[g]
            held = columns[g] < width
            backwards = torch.empty(width, dtype=torch.int64)
            backwards[columns[g][held]] = torch.nonzero(held)[:, 0]
            inverse.append(backwards)
            starts.append(starts[-1] + width)
        # plain attributes, out of the state_dict and of casts (the change of basis
        # stays float64): moved by ``_apply`` (eager) or at the next call (scripted,
        # ``_follow_device``)
        self._inverse = torch.cat(inverse)
        self._inverse_start = starts
        self._all_samples = all_samples
        self._write = self._script_write(columns)
        basis_matrices, rotations = basis_tables(
            [(s.l, s.mul, s.offset) for s in plan.segments] if self._e3nn_basis else []
        )
        self._basis = basis_matrices
        self._rotations = rotations

    def _script_write(self, columns: torch.Tensor) -> torch.jit.ScriptModule:
        return torch.jit.script(_WriteTensorMap(self.plan, columns, self._all_samples, self.check))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self._write._device.device
        self._basis = self._basis.to(device=device)
        self._inverse = self._inverse.to(device=device)
        return self

    def __getstate__(self):
        # the scripted metadata steps do not pickle: rebuilt from the plan
        state = self.__dict__.copy()
        state["_modules"] = {k: v for k, v in self._modules.items() if k != "_write"}
        state["_write_device"] = self._write._device.device
        return state

    def __setstate__(self, state):
        device = state.pop("_write_device")
        super().__setstate__(state)
        columns = self.plan.column_map(self.basis, self.layout)
        self._write = self._script_write(columns).to(device)

    def _follow_device(self, device: torch.device) -> None:
        """Scripted modules: ``.to()`` moves buffers only; the tables follow the
        metadata step's device at the next call (eager modules: ``_apply``)."""
        if self._inverse.device != device:
            self._inverse = self._inverse.to(device)
            self._basis = self._basis.to(device)

    def extra_repr(self) -> str:
        return f"{self.irreps_in}, basis={self.basis}, layout={self.layout}"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"

    @torch.jit.unused
    def keys(self) -> Labels:
        """Keys of the output TensorMap."""
        return self.plan.keys()

    def move(self, x: torch.Tensor, order: torch.Tensor, counts: List[int]) -> List[torch.Tensor]:
        """The data step alone, pure tensor code: the change of basis back to
        featomic's, the rows of each group, each group's blocks side by side."""
        if self._e3nn_basis:
            x = rotate(x, self._basis, self._rotations, self._mul_ir, True)
        if len(counts) > 1:
            x = x.index_select(0, order)
        parts: List[torch.Tensor] = []
        start = 0
        for g in range(len(counts)):
            columns = self._inverse[self._inverse_start[g] : self._inverse_start[g + 1]]
            index = columns.unsqueeze(0).expand(counts[g], columns.shape[0])
            parts.append(torch.gather(x[start : start + counts[g]], 1, index))
            start += counts[g]
        return parts

    def forward(self, x: torch.Tensor, samples: Labels) -> TensorMap:
        if self._e3nn_basis and not torch.is_floating_point(x):
            raise ValueError(
                "the input must be floating point for the e3nn basis change, got "
                + dtype_name(x.dtype)
            )
        if torch.jit.is_scripting():
            order, counts, sample_values, sample_names = self._write.group(x, samples)
            self._follow_device(x.device)
        else:
            order, counts, sample_values, sample_names = self._group_eager(x, samples)
        parts = self.move(x, order, counts)
        if torch.jit.is_scripting():
            return self._write.write(parts, sample_values, counts, sample_names)
        return self._write_eager(parts, sample_values, counts, sample_names)

    @torch.jit.unused
    def _group_eager(
        self, x: torch.Tensor, samples: Labels
    ) -> Tuple[torch.Tensor, List[int], torch.Tensor, List[str]]:
        return call_scripted(self._write.group, x, samples)

    @torch.jit.unused
    def _write_eager(
        self,
        parts: List[torch.Tensor],
        samples: torch.Tensor,
        counts: List[int],
        sample_names: List[str],
    ) -> TensorMap:
        return call_scripted(self._write.write, parts, samples, counts, sample_names)
