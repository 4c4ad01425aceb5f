"""``TensorMapToIrreps``: metatensor TensorMap -> flat e3nn tensor."""

from typing import List, Optional, Sequence, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from ._conventions import BASES, LAYOUTS, check_option
from ._fused import fused_basis, fused_ops, may_fuse
from ._plan import Layout
from ._tables import (
    basis_tables,
    check_block,
    describe_key,
    int_list,
    inverse_permutation,
    labels,
    lexsort,
    scatter_rows,
    unique_rows,
)


def _run(form: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """A run of channels; the whole tensor when the run covers it (a narrow, even a
    full one, costs a zero-filled copy of the block in backward)."""
    if start == 0 and length == form.shape[dim]:
        return form
    return form.narrow(dim, start, length)


def _same(
    actual: torch.Tensor, expected: torch.Tensor, on_cpu: bool, flags: List[torch.Tensor]
) -> bool:
    """False when ``actual != expected`` is known now. On the CPU, torch.equal; on
    other devices the comparison goes to ``flags``, all read at once later."""
    if actual.shape != expected.shape:
        return False
    if on_cpu:
        return torch.equal(actual, expected)
    flags.append((actual == expected).all())
    return True


def _dtype_name(value: torch.Tensor) -> str:
    return str(value.dtype)


class TensorMapToIrreps(torch.nn.Module):
    r"""Convert a :py:class:`~metatensor.torch.TensorMap` of spherical tensors (as
    produced by featomic's ``SphericalExpansion``, ``LodeSphericalExpansion`` or
    λ-SOAP) to a flat ``[n_rows, irreps_out.dim]`` tensor for e3nn.

    The layout is planned once from the metadata of ``template``:

    - one irrep per ``(o3_lambda, o3_sigma)``, with parity
      ``p = o3_sigma * (-1) ** o3_lambda``, in e3nn's order;
    - the ``row_keys`` key dimensions (default ``center_type``) move to rows, which are
      the union of all blocks' samples in lexicographic order;
    - every other key dimension (e.g. ``neighbor_type``) moves to channels, ordered by
      (key values, then property entries), the union over the template's blocks;
    - absent blocks and absent entries are zeros; keys are matched by value.

    Parameters
    ----------
    template : TensorMap
        Only its metadata (keys, components, properties, sample names) is read.
    basis : {"e3nn", "featomic"}
        ``"e3nn"`` rotates every l-segment into e3nn's spherical-harmonics basis
        (a permutation for l <= 1, a dense matrix for l >= 2); ``"featomic"`` keeps
        the values unchanged.
    layout : {"mul_ir", "ir_mul"}
        e3nn's ``[mul, 2l+1]`` segments or cuequivariance's ``[2l+1, mul]``.
    row_keys : sequence of str, optional
        Key dimensions moved to rows. Defaults to ``["center_type"]`` when present.
    check : bool
        Validate every block (default): sample and property names, ``o3_mu``
        components, no gradient blocks, no duplicated rows. ``check=False`` skips
        these for inputs known to come from the template's producer (the property
        and sample values are still compared: they choose the fast path).
    kernel : {"torch", "fused", "auto"}
        How values move on the CPU. ``"torch"`` (default): PyTorch operators only,
        so that a scripted module loads wherever metatensor-torch does.
        ``"fused"``: metadata checks and one pass over the data in compiled code,
        4.4-15x faster forward, 4.8-9.9x faster forward+backward, no
        intermediates on the benchmarks' reference case and a 17x lower per-call
        floor (benchmarks/README.md, 2 threads); the kernel is compiled on
        first use (~2 min, cached), and a scripted module using it needs
        ``torch.ops.load_library(rascaline_e3nn.library_path())`` in the process
        that loads it. ``"auto"``: fused when the kernel can be built, else torch.
        Other devices and ``torch.compile`` always use PyTorch operators.

    Examples
    --------
    >>> import torch
    >>> from metatensor.torch import Labels, TensorBlock, TensorMap
    >>> def block(l, n_props):
    ...     return TensorBlock(
    ...         values=torch.arange(2 * (2 * l + 1) * n_props, dtype=torch.float64)
    ...         .reshape(2, 2 * l + 1, n_props),
    ...         samples=Labels(["system", "atom"], torch.tensor([[0, 0], [0, 1]])),
    ...         components=[Labels(["o3_mu"], torch.arange(-l, l + 1).reshape(-1, 1))],
    ...         properties=Labels(["n"], torch.arange(n_props).reshape(-1, 1)),
    ...     )
    >>> keys = Labels(["o3_lambda", "o3_sigma"], torch.tensor([[1, 1], [0, 1]]))
    >>> tensor = TensorMap(keys, [block(1, 2), block(0, 3)])
    >>> to_irreps = TensorMapToIrreps(tensor, basis="featomic")
    >>> to_irreps
    TensorMapToIrreps(3x0e+2x1o, basis=featomic, layout=mul_ir)
    >>> x = to_irreps(tensor)
    >>> x.shape
    torch.Size([2, 9])
    >>> x[0, 3:6]  # first l=1 channel: o3_mu = -1, 0, 1 of property n=0
    tensor([0., 2., 4.], dtype=torch.float64)
    >>> to_irreps.samples(tensor).names
    ['system', 'atom']
    >>> y, rows = to_irreps.forward_with_samples(tensor)  # both, metadata read once
    >>> torch.equal(y, x), rows == to_irreps.samples(tensor)
    (True, True)
    """

    _key_names: List[str]
    _sample_names: List[str]
    _row_key_names: List[str]
    _block_l: List[int]
    _block_group: List[int]
    _block_prop_ptr: List[int]
    _block_prop_dims: List[int]
    _block_prop_names: List[List[str]]
    _mu_of_l: List[torch.Tensor]
    _properties_of_block: List[torch.Tensor]
    _group_blocks: List[int]
    _group_block_ptr: List[int]
    _seg_l: List[int]
    _seg_mul: List[int]
    _piece_block: List[int]
    _piece_start: List[int]
    _piece_len: List[int]
    _piece_ptr: List[int]
    _fused_meta: List[int]
    _fused_columns: List[int]
    __jit_unused_properties__ = ["_fused"]

    def __init__(
        self,
        template: TensorMap,
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
        row_keys: Optional[Sequence[str]] = None,
        check: bool = True,
        kernel: str = "torch",
    ):
        super().__init__()
        self.basis = check_option("basis", basis, BASES)
        self.layout = check_option("layout", layout, LAYOUTS)
        plan = Layout.from_tensor_map(template, row_keys)
        self._setup(plan, check, kernel)

    def _setup(self, plan: Layout, check: bool, kernel: str) -> None:
        self.plan = plan
        self.irreps_out = plan.irreps_e3nn
        self._e3nn_basis = self.basis == "e3nn"
        self._channel_dim = 1 if self.layout == "mul_ir" else 2
        self._check = check
        self._dim = plan.dim

        self._key_names = list(plan.key_names)
        self._sample_names = list(plan.sample_names)
        self._row_key_names = list(plan.row_key_names)
        self._n_blocks = len(plan.blocks)
        self._n_groups = len(plan.groups)
        self._n_segments = len(plan.segments)

        # template keys stay on the host: keys are matched there
        self._keys_host = torch.tensor([b.key for b in plan.blocks], dtype=torch.int32)
        self._block_l = [b.l for b in plan.blocks]
        self._block_group = [b.group for b in plan.blocks]
        ptr = [0]
        dims: List[int] = []
        for b in plan.blocks:
            ptr.append(ptr[-1] + b.properties.numel())
            dims.append(b.properties.shape[1])
        self._block_prop_ptr = ptr
        self._block_prop_dims = dims
        self._block_prop_names = [list(plan.property_names[(b.l, b.p)]) for b in plan.blocks]
        group_blocks: List[int] = []
        group_block_ptr = [0]
        for g in range(len(plan.groups)):
            group_blocks.extend(t for t, b in enumerate(plan.blocks) if b.group == g)
            group_block_ptr.append(len(group_blocks))
        self._group_blocks = group_blocks
        self._group_block_ptr = group_block_ptr
        props = torch.cat([b.properties.reshape(-1) for b in plan.blocks])
        self.register_buffer("_props", props, persistent=False)

        self.register_buffer("_group_keys", plan.group_keys(), persistent=False)

        self._seg_l = [s.l for s in plan.segments]
        self._seg_mul = [s.mul for s in plan.segments]
        piece_block, piece_start, piece_len, piece_ptr = plan.piece_tables()
        self._piece_block = piece_block
        self._piece_start = piece_start
        self._piece_len = piece_len
        self._piece_ptr = piece_ptr

        basis_matrices, perm, inverse = basis_tables(plan.max_l)
        self.register_buffer("_basis", basis_matrices, persistent=False)
        self.register_buffer("_perm1", perm, persistent=False)
        self.register_buffer("_perm1_inverse", inverse, persistent=False)
        L = plan.max_l
        self.register_buffer(
            "_mu", torch.arange(-L, L + 1, dtype=torch.int32), persistent=False
        )
        # host copies for the checks of CPU inputs (moved per call for other devices)
        self._mu_of_l = [torch.arange(-l, l + 1, dtype=torch.int32) for l in range(L + 1)]
        self._properties_of_block = [b.properties.clone() for b in plan.blocks]

        self.kernel = kernel
        self._ops = fused_ops(kernel)
        self._fused_meta, self._fused_columns = plan.fused_tables(self.layout)
        # host copy: the fused kernel reads the metadata on the CPU
        self._group_keys_host = plan.group_keys()

    # ------------------------------------------------------------------ metadata

    @classmethod
    def from_calculator(
        cls,
        calculator: torch.nn.Module,
        atom_types: Sequence[int],
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
        row_keys: Optional[Sequence[str]] = None,
        check: bool = True,
        kernel: str = "torch",
    ) -> "TensorMapToIrreps":
        """The layout of a featomic-torch ``SphericalExpansion`` or
        ``LodeSphericalExpansion`` for a batch containing every pair of
        ``atom_types``, read from ``calculator.parameters`` without computing."""
        from ._calculator import template_from_calculator

        template = template_from_calculator(calculator, atom_types)
        return cls(
            template, basis=basis, layout=layout, row_keys=row_keys, check=check,
            kernel=kernel,
        )

    @torch.jit.unused
    def inverse(self):
        """The :py:class:`IrrepsToTensorMap` undoing this conversion."""
        from ._to_tensor_map import IrrepsToTensorMap

        return IrrepsToTensorMap._from_plan(
            self.plan, basis=self.basis, layout=self.layout, check=self._check,
            kernel=self.kernel,
        )

    @torch.jit.unused
    def keys(self) -> Labels:
        """Keys of the planned layout (the template's keys)."""
        return self.plan.keys()

    @property
    def _fused(self) -> bool:
        """Whether this module calls the fused kernel (for CPU inputs)."""
        return self._ops is not None

    def extra_repr(self) -> str:
        return f"{self.irreps_out}, basis={self.basis}, layout={self.layout}"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"

    # ------------------------------------------------------------------ forward

    def _match_keys(self, keys: Labels) -> List[int]:
        names = keys.names
        if len(names) != len(self._key_names):
            raise ValueError(
                "the input keys have dimensions " + str(names) + ", the layout expects "
                + str(self._key_names)
            )
        columns: List[int] = []
        for name in self._key_names:
            if name not in names:
                raise ValueError(
                    "the input keys have dimensions " + str(names)
                    + ", the layout expects " + str(self._key_names)
                )
            columns.append(names.index(name))
        values = keys.values.to("cpu")[:, columns]
        equal = (values.unsqueeze(1) == self._keys_host.unsqueeze(0)).all(dim=2)
        found = equal.any(dim=1)
        if not bool(found.all()):
            missing = int(torch.nonzero(~found)[0, 0])
            raise ValueError(
                "block " + describe_key(self._key_names, values[missing])
                + " is not in the layout planned from the template; build the module "
                + "from a template (or calculator and atom_types) containing this key"
            )
        slots: List[int] = equal.to(torch.int32).argmax(dim=1).tolist()
        seen: List[bool] = [False] * self._n_blocks
        for i in range(len(slots)):
            if seen[slots[i]]:
                raise ValueError(
                    "block " + describe_key(self._key_names, values[i])
                    + " appears twice in the input keys"
                )
            seen[slots[i]] = True
        return slots

    def _collect(
        self, tensor: TensorMap
    ) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]:
        """Values of every planned block (None where absent), expanded to the rows of
        their group, and the samples of each group."""
        slots = self._match_keys(tensor.keys)
        blocks = tensor.blocks()
        device = tensor.keys.values.device
        values: List[Optional[torch.Tensor]] = []
        samples: List[Optional[torch.Tensor]] = []
        first: List[int] = []
        for _ in range(self._n_blocks):
            values.append(None)
            samples.append(None)
        for _ in range(self._n_groups):
            first.append(-1)

        # The common case, checked with one device->host read in all: every block has
        # its template's properties (and o3_mu components), and the blocks of a group
        # share their samples. Anything else takes the detailed path below, which
        # handles (or names) it block by block.
        fast = True
        # on a GPU, the comparisons are gathered into one read; on the CPU there is
        # nothing to synchronise and torch.equal is the cheapest comparison
        on_cpu = device.type == "cpu"
        flags: List[torch.Tensor] = []
        # names and gradients are the same for every block of a TensorMap (metatensor
        # refuses anything else): one look for the whole map
        if len(blocks) > 0 and (
            tensor.sample_names != self._sample_names
            or tensor.component_names != ["o3_mu"]
            or tensor.property_names != self._block_prop_names[slots[0]]
            or len(blocks[0].gradients_list()) != 0
        ):
            fast = False
        for i in range(len(slots)):
            if not fast:
                break
            t = slots[i]
            block = blocks[i]
            l = self._block_l[t]
            value = block.values
            if value.dim() != 3 or value.shape[1] != 2 * l + 1:
                fast = False
                break
            if self._e3nn_basis and not value.is_floating_point():
                raise ValueError(
                    "block " + describe_key(self._key_names, self._keys_host[t])
                    + " has values of dtype " + _dtype_name(value)
                    + ": the e3nn basis change needs floating point values"
                )
            block_samples = block.samples
            properties = block.properties
            if self._check:
                components = block.components
                if components[0].values.shape[0] != 2 * l + 1:
                    fast = False
                    break
                if on_cpu:
                    mu = self._mu_of_l[l]
                else:
                    # the module's buffer: on the input's device when the module is
                    L = (self._mu.shape[0] - 1) // 2
                    mu = self._mu[L - l : L + l + 1].to(device)
                if not _same(components[0].values.reshape(-1), mu, on_cpu, flags):
                    fast = False
                    break
            actual = properties.values
            if on_cpu:
                expected = self._properties_of_block[t]
            else:
                expected = self._template_properties(t).to(device)
            if not _same(actual, expected, on_cpu, flags):
                fast = False
                break
            sample_values = block_samples.values
            values[t] = value
            samples[t] = sample_values
            g = self._block_group[t]
            if first[g] < 0:
                first[g] = t
            else:
                reference = samples[first[g]]
                assert reference is not None
                if not _same(sample_values, reference, on_cpu, flags):
                    fast = False
                    break
        if fast and len(flags) > 0:
            fast = bool(torch.stack(flags).all())
        if fast:
            group_samples: List[torch.Tensor] = []
            for g in range(self._n_groups):
                if first[g] < 0:
                    group_samples.append(
                        torch.zeros(
                            (0, len(self._sample_names)), dtype=torch.int32, device=device
                        )
                    )
                else:
                    s = samples[first[g]]
                    assert s is not None
                    group_samples.append(s)
            return values, group_samples
        return self._collect_in_detail(slots, blocks, device)

    def _collect_in_detail(
        self, slots: List[int], blocks: List[TensorBlock], device: torch.device
    ) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]:
        values: List[Optional[torch.Tensor]] = []
        samples: List[Optional[torch.Tensor]] = []
        for _ in range(self._n_blocks):
            values.append(None)
            samples.append(None)
        for i in range(len(slots)):
            t = slots[i]
            block = blocks[i]
            l = self._block_l[t]
            if self._check:
                where = describe_key(self._key_names, self._keys_host[t])
                check_block(block, l, self._mu, self._sample_names, where)
            value = block.values
            if value.dim() != 3 or value.shape[1] != 2 * l + 1:
                raise ValueError(
                    "block " + describe_key(self._key_names, self._keys_host[t])
                    + " has values of shape " + str(value.shape)
                    + ", expected [samples, " + str(2 * l + 1) + ", properties]"
                )
            values[t] = self._match_properties(t, value, block.properties)
            samples[t] = block.samples.values

        group_samples: List[torch.Tensor] = []
        for g in range(self._n_groups):
            present: List[int] = []
            for t in range(self._n_blocks):
                if self._block_group[t] == g and samples[t] is not None:
                    present.append(t)
            if len(present) == 0:
                group_samples.append(
                    torch.zeros(
                        (0, len(self._sample_names)), dtype=torch.int32, device=device
                    )
                )
                continue
            first = samples[present[0]]
            assert first is not None
            shared = True
            for t in present:
                s = samples[t]
                assert s is not None
                if s.shape[0] != first.shape[0] or not torch.equal(s, first):
                    shared = False
                    break
            if shared:
                group_samples.append(first)
                continue
            # generic path: union of the samples, each block expanded to it
            everything: List[torch.Tensor] = []
            for t in present:
                s = samples[t]
                assert s is not None
                everything.append(s)
            union, inverse = unique_rows(torch.cat(everything))
            start = 0
            for t in present:
                v = values[t]
                assert v is not None
                n = v.shape[0]
                if torch.unique(inverse[start : start + n]).shape[0] != n:
                    raise ValueError(
                        "block " + describe_key(self._key_names, self._keys_host[t])
                        + " has duplicated samples"
                    )
                full = torch.zeros(
                    (union.shape[0], v.shape[1], v.shape[2]),
                    dtype=v.dtype,
                    device=v.device,
                )
                values[t] = full.index_copy(0, inverse[start : start + n], v)
                start += n
            group_samples.append(union)
        return values, group_samples

    def _template_properties(self, t: int) -> torch.Tensor:
        expected = self._props[self._block_prop_ptr[t] : self._block_prop_ptr[t + 1]]
        return expected.reshape(-1, self._block_prop_dims[t])

    def _match_properties(
        self, t: int, value: torch.Tensor, properties: Labels
    ) -> torch.Tensor:
        expected = self._template_properties(t).to(value.device)
        actual = properties.values
        if properties.names != self._block_prop_names[t]:
            raise ValueError(
                "block " + describe_key(self._key_names, self._keys_host[t])
                + " has properties " + str(properties.names) + ", the template has "
                + str(self._block_prop_names[t])
            )
        if actual.shape == expected.shape and torch.equal(actual, expected):
            return value
        where = describe_key(self._key_names, self._keys_host[t])
        if actual.shape[1] != expected.shape[1]:
            raise ValueError(
                "block " + where + " has properties " + str(properties.names)
                + " which do not match the template's"
            )
        equal = (actual.unsqueeze(1) == expected.unsqueeze(0)).all(dim=2)
        found = equal.any(dim=1)
        if not bool(found.all()):
            missing = int(torch.nonzero(~found)[0, 0])
            raise ValueError(
                "block " + where + " has property " + str(int_list(actual[missing]))
                + " " + str(properties.names) + " which is not in the template"
            )
        index = equal.to(torch.int32).argmax(dim=1)
        full = torch.zeros(
            (value.shape[0], value.shape[1], expected.shape[0]),
            dtype=value.dtype,
            device=value.device,
        )
        return full.index_copy(2, index, value)

    def _rows(self, group_samples: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """All rows (samples then row keys), sorted, and the output position of each
        row of the groups concatenated in order."""
        parts: List[torch.Tensor] = []
        for g in range(self._n_groups):
            s = group_samples[g]
            key = self._group_keys[g].to(s.device).unsqueeze(0)
            parts.append(torch.cat([s, key.expand(s.shape[0], key.shape[1])], dim=1))
        rows = torch.cat(parts)
        order = lexsort(rows)
        rows = rows.index_select(0, order)
        if self._check and rows.shape[0] > 1:
            same = (rows[1:] == rows[:-1]).all(dim=1)
            if bool(same.any()):
                i = int(torch.nonzero(same)[0, 0])
                raise ValueError(
                    "duplicated sample "
                    + describe_key(self._sample_names + self._row_key_names, rows[i])
                    + " in the input blocks"
                )
        return rows, inverse_permutation(order)

    def _channel_form(self, v: torch.Tensor, l: int, basis: torch.Tensor) -> torch.Tensor:
        """``[n, P, 2l+1]`` (mul_ir) or ``[n, 2l+1, P]`` (ir_mul), in the output basis."""
        if self._e3nn_basis and l == 1:
            v = v.index_select(1, self._perm1)
        if self._e3nn_basis and l >= 2:
            # one 2-D GEMM each (torch.matmul would run n tiny batched products)
            D = basis[l, : 2 * l + 1, : 2 * l + 1]
            if self._channel_dim == 1:
                # [n, P, 2l+1], contiguous
                return torch.tensordot(v, D, dims=([1], [1]))
            # [n, 2l+1, P], a view of a [2l+1, n, P] result: every [:, m] is contiguous
            return torch.tensordot(D, v, dims=([1], [1])).movedim(0, 1)
        if self._channel_dim == 1:
            # one transposing copy, after which every channel run is a plain view
            return v.transpose(1, 2).contiguous()
        return v

    @torch.jit.export
    def samples(self, tensor: TensorMap) -> Labels:
        """Metadata of the rows of ``forward(tensor)``: the block sample dimensions,
        then the key dimensions moved to rows."""
        if self._ops is not None and self._n_blocks > 0 and may_fuse():
            found = self._ops.samples_map(
                tensor, self._key_names, self._keys_host, self._sample_names,
                self._row_key_names, self._block_prop_names[0], self._block_l,
                self._block_group, self._properties_of_block, self._group_keys_host,
                self._check,
            )
            if len(found) == 1:
                return found[0]
        _, group_samples = self._collect(tensor)
        rows, _ = self._rows(group_samples)
        return labels(self._sample_names + self._row_key_names, rows)

    @torch.jit.export
    def forward_with_samples(self, tensor: TensorMap) -> Tuple[torch.Tensor, Labels]:
        """``(forward(tensor), samples(tensor))`` in one call, for batches whose rows
        change from call to call (featomic batches): the metadata work (matching the
        keys, the union of every center type's samples, the order of the rows) is
        done once instead of twice."""
        if self._ops is not None and self._n_blocks > 0 and may_fuse():
            done, out, found = self._ops.to_irreps_samples_map(
                tensor, self._key_names, self._keys_host, self._sample_names,
                self._row_key_names, self._block_prop_names[0], self._block_l,
                self._block_group, self._properties_of_block, self._group_keys_host,
                self._check, fused_basis(self._e3nn_basis, self._basis),
                self._fused_meta, self._fused_columns, self._dim,
            )
            if done:
                if len(found) == 1:
                    return out, found[0]
                # rows not unique (check=False): samples() names the problem
                return out, self.samples(tensor)
        values, group_samples = self._collect(tensor)
        rows, position = self._rows(group_samples)
        out = self._convert(values, group_samples, position)
        return out, labels(self._sample_names + self._row_key_names, rows)

    def forward(self, tensor: TensorMap) -> torch.Tensor:
        if self._ops is not None and self._n_blocks > 0 and may_fuse():
            done, out = self._fused_map(tensor)
            if done:
                return out

        values, group_samples = self._collect(tensor)
        _, position = self._rows(group_samples)
        return self._convert(values, group_samples, position)

    def _convert(
        self,
        values: List[Optional[torch.Tensor]],
        group_samples: List[torch.Tensor],
        position: torch.Tensor,
    ) -> torch.Tensor:
        """The flat tensor of the collected block values (rows: ``position``)."""
        dtype = torch.zeros(0).dtype  # the default dtype, when no block is present
        device = self._basis.device
        for v in values:
            if v is not None:
                dtype = v.dtype
                device = v.device
                break
        if (
            self._ops is not None
            and device.type == "cpu"
            and (dtype == torch.float32 or dtype == torch.float64)
            and may_fuse()
        ):
            present: List[torch.Tensor] = []
            slots: List[int] = []
            for t in range(self._n_blocks):
                v = values[t]
                if v is not None:
                    present.append(v)
                    slots.append(t)
            if len(present) > 0:
                group_rows: List[int] = []
                for g in range(self._n_groups):
                    group_rows.append(group_samples[g].shape[0])
                return self._ops.to_irreps(
                    present, slots, position, group_rows,
                    fused_basis(self._e3nn_basis, self._basis),
                    self._fused_meta, self._fused_columns, self._dim,
                )

        basis = self._basis.to(dtype=dtype, device=device)
        out = torch.empty((position.shape[0], self._dim), dtype=dtype, device=device)
        # Without autograd, row groups go one after the other straight into the
        # output, so that the memory of one group's intermediates is reused by the
        # next (fresh pages cost more than the copies). With autograd, one scatter of
        # all the rows: successive in-place scatters would each copy the whole
        # gradient in backward.
        needs_grad = False
        if torch.is_grad_enabled():
            for v in values:
                if v is not None and v.requires_grad:
                    needs_grad = True
        grouped: List[torch.Tensor] = []
        forms: List[Optional[torch.Tensor]] = []
        for t in range(self._n_blocks):
            forms.append(None)
        start = 0
        for g in range(self._n_groups):
            n = group_samples[g].shape[0]
            for i in range(self._group_block_ptr[g], self._group_block_ptr[g + 1]):
                t = self._group_blocks[i]
                v = values[t]
                if v is not None:
                    forms[t] = self._channel_form(v, self._block_l[t], basis)
            # 2-D pieces [n, width] in the order of the output columns: one cat
            pieces: List[torch.Tensor] = []
            for s in range(self._n_segments):
                k0 = self._piece_ptr[g * self._n_segments + s]
                k1 = self._piece_ptr[g * self._n_segments + s + 1]
                self._segment_pieces(pieces, forms, s, k0, k1, n, dtype, device)
            for i in range(self._group_block_ptr[g], self._group_block_ptr[g + 1]):
                forms[self._group_blocks[i]] = None
            if len(pieces) == 0:  # every segment without channels
                group = torch.zeros((n, 0), dtype=dtype, device=device)
            elif len(pieces) == 1:
                group = pieces[0].reshape(n, self._dim)
            else:
                group = torch.cat(pieces, dim=1)
            if needs_grad:
                grouped.append(group)
            else:
                scatter_rows(out, position[start : start + n], group)
            start += n
        if needs_grad:
            if len(grouped) == 1:
                scatter_rows(out, position, grouped[0])
            else:
                scatter_rows(out, position, torch.cat(grouped, dim=0))
        return out

    def _fused_map(self, tensor: TensorMap) -> Tuple[bool, torch.Tensor]:
        """The common case, metadata included, in one call of the fused kernel (CPU,
        float32/64); anything else comes back as ``(False, _)``."""
        return self._ops.to_irreps_map(
            tensor, self._key_names, self._keys_host, self._sample_names,
            self._block_prop_names[0], self._block_l, self._block_group,
            self._properties_of_block, self._group_keys_host, self._check,
            fused_basis(self._e3nn_basis, self._basis), self._fused_meta,
            self._fused_columns, self._dim,
        )

    def _segment_pieces(
        self,
        pieces: List[torch.Tensor],
        forms: List[Optional[torch.Tensor]],
        s: int,
        k0: int,
        k1: int,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Append the [n, width] pieces of segment s (channel runs k0..k1) to pieces."""
        l = self._seg_l[s]
        n_m = 2 * l + 1
        cd = self._channel_dim
        # runs of channels: [n, run, 2l+1] (mul_ir) or [n, 2l+1, run] (ir_mul)
        parts: List[torch.Tensor] = []
        for k in range(k0, k1):
            t = self._piece_block[k]
            length = self._piece_len[k]
            form: Optional[torch.Tensor] = None
            if t >= 0:
                form = forms[t]
            if form is not None:
                parts.append(_run(form, cd, self._piece_start[k], length))
            elif cd == 1:
                parts.append(torch.zeros((n, length, n_m), dtype=dtype, device=device))
            else:
                parts.append(torch.zeros((n, n_m, length), dtype=dtype, device=device))
        if cd == 1:
            # mul_ir: each run is a contiguous [n, run * (2l+1)] piece of the row
            for part in parts:
                pieces.append(part.reshape(n, part.shape[1] * n_m))
        else:
            # ir_mul: [n, 2l+1, mul] from a cat along the channel axis (copies whole
            # runs: much faster than one piece per m)
            width = n_m * self._seg_mul[s]
            if len(parts) == 1:
                pieces.append(parts[0].reshape(n, width))
            elif len(parts) > 1:
                pieces.append(torch.cat(parts, dim=2).reshape(n, width))
