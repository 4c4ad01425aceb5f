"""``TensorMapToIrreps``: metatensor TensorMap -> flat e3nn tensor."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from metatensor.torch import Labels, TensorMap

from ._batch import (
    basis_tables,
    call_scripted,
    describe,
    dtype_name,
    entry,
    host_read,
    int_list,
    join,
    lexsort,
    rotate,
    sorted_runs,
)
from ._conventions import BASES, LAYOUTS, UNLISTED_ROWS, check_option
from ._layout import Layout


class _ReadTensorMap(torch.nn.Module):
    """The metadata step of :class:`TensorMapToIrreps`, compiled with TorchScript.

    From a batch's blocks, it makes one tensor per row group (the group's blocks side
    by side, ``[n_rows, width]``), the column map of each group into the output, and
    the order of the rows. Keys are matched by value; absent blocks are zeros. The
    host reads: the keys (one ``torch.equal`` with the template's), then the verdict
    of the checks of all blocks in one read (``host_read``), and one more read when
    the blocks of a row group hold different samples (the size of their union).
    """

    _key_names: List[str]
    _keys: List[List[int]]
    _sample_names: List[str]
    _row_key_names: List[str]
    _property_names: List[str]
    _slot_l: List[int]
    _slot_n_properties: List[int]
    _slot_start: List[int]
    _group_slots: List[List[int]]
    _group_keys: List[List[int]]
    _group_width: List[int]
    _group_holes: List[bool]
    _property_start: List[int]
    _key_values: torch.Tensor
    _columns: torch.Tensor
    _properties: torch.Tensor
    _mu: torch.Tensor
    _hash_weights: torch.Tensor

    def __init__(
        self,
        plan: Layout,
        columns: torch.Tensor,
        e3nn_basis: bool,
        check: bool,
        drop_unlisted: bool = False,
    ):
        super().__init__()
        self._drop_unlisted = drop_unlisted
        # The tables are plain attributes, not buffers: derived from the plan, they
        # must stay out of ``state_dict`` (TorchScript keeps no buffer out of it, so
        # loading a checkpoint would overwrite them) and out of reach of casts. The
        # one buffer is an empty device marker that ``.to()`` moves; the tables
        # follow it at the next call (``_follow_device``).
        self.register_buffer("_device", torch.zeros(0, dtype=torch.int32))
        self._check = check
        self._e3nn_basis = e3nn_basis
        self._dim = plan.dim
        self._key_names = list(plan.key_names)
        self._keys = [list(b.key) for b in plan.blocks]
        self._key_values = plan.keys().values.clone()
        self._sample_names = list(plan.sample_names)
        self._row_key_names = list(plan.row_key_names)
        self._property_names = list(plan.property_names)
        self._slot_l = [b.l for b in plan.blocks]
        self._slot_n_properties = [b.properties.shape[0] for b in plan.blocks]
        self._group_slots = [plan.group_blocks(g) for g in range(len(plan.groups))]
        self._group_keys = [list(k) for k in plan.groups]
        starts, widths = plan.offsets()
        self._slot_start = starts
        self._group_width = widths
        self._group_holes = [
            bool((columns[g] == widths[g]).any()) for g in range(len(plan.groups))
        ]
        self._columns = columns
        properties = [b.properties.reshape(-1) for b in plan.blocks]
        ptr = [0]
        for p in properties:
            ptr.append(ptr[-1] + p.shape[0])
        self._property_start = ptr
        self._properties = torch.cat(properties)
        L = plan.max_l
        mu = [torch.arange(-l, l + 1, dtype=torch.int32) for l in range(L + 1)]
        self._mu = torch.cat(mu)
        weights = [6364136223846793005 * (c + 1) % 2**61 + 1 for c in range(len(plan.sample_names))]
        self._hash_weights = torch.tensor(weights)

    def _follow_device(self) -> None:
        """Move the tables to the device marker's device (after ``.to()``; once)."""
        device = self._device.device
        if self._columns.device != device:
            self._key_values = self._key_values.to(device)
            self._columns = self._columns.to(device)
            self._properties = self._properties.to(device)
            self._mu = self._mu.to(device)
            self._hash_weights = self._hash_weights.to(device)

    # ------------------------------------------------------------------ keys

    def _match_keys(self, keys: Labels) -> List[int]:
        """For every template block, its index in the input (-1: absent). A batch
        with the template's keys in the template's order costs one host read (with
        or without ``check``); any other is matched by value, and a key the layout
        does not know is an error naming it."""
        n_slots = len(self._keys)
        if keys.names == self._key_names and len(keys) == n_slots:
            # the one read of the keys (Labels == ignores the order of the entries)
            if torch.equal(keys.values, self._key_values):
                return list(range(n_slots))
        names = keys.names
        if sorted(names) != sorted(self._key_names):
            raise ValueError(
                "the input keys have dimensions " + str(names) + ", the layout expects "
                + str(self._key_names)
            )
        columns: List[int] = []
        for name in self._key_names:
            columns.append(names.index(name))
        n_dims = len(columns)
        flat = host_read(keys.values[:, columns].to(torch.int64).reshape(-1))
        values: List[List[int]] = []
        for i in range(len(keys)):
            values.append(flat[i * n_dims : (i + 1) * n_dims])
        where: Dict[str, int] = {}
        for t in range(n_slots):
            where[str(self._keys[t])] = t
        slots: List[int] = [-1] * n_slots
        for i in range(len(values)):
            t = where.get(str(values[i]), -1)
            if t < 0:
                raise ValueError(
                    "block " + describe(self._key_names, values[i])
                    + " is not in the layout planned from the template; build the module "
                    + "from a template (or calculator and atom_types) containing this key"
                )
            if slots[t] >= 0:
                raise ValueError(
                    "block " + describe(self._key_names, values[i])
                    + " appears twice in the input keys"
                )
            slots[t] = i
        return slots

    def _name(self, t: int) -> str:
        return "block " + describe(self._key_names, self._keys[t])

    # ------------------------------------------------------------------ blocks

    def _values(
        self, tensor: TensorMap, slots: List[int]
    ) -> Tuple[
        List[Optional[torch.Tensor]],
        List[Optional[torch.Tensor]],
        List[torch.Tensor],
        List[torch.Tensor],
        List[int],
    ]:
        """Values and sample values of every template block (None: absent); blocks
        whose properties differ in number from the template's are expanded to them.
        With ``check``, also the o3_mu and property values to compare with the
        template's (``actual``, ``expected``), compared later with the samples."""
        if len(tensor.keys) > 0:
            if tensor.sample_names != self._sample_names:
                raise ValueError(
                    "the input blocks have samples " + str(tensor.sample_names)
                    + ", the template has " + str(self._sample_names)
                )
            if tensor.component_names != ["o3_mu"]:
                raise ValueError(
                    "the input blocks have components " + str(tensor.component_names)
                    + ", expected ['o3_mu']"
                )
            if tensor.property_names != self._property_names:
                raise ValueError(
                    "the input blocks have properties " + str(tensor.property_names)
                    + ", the template has " + str(self._property_names)
                )
            gradients = tensor.block_by_id(0).gradients_list()
            if len(gradients) != 0:
                raise ValueError(
                    "the input blocks have gradients " + str(gradients)
                    + ": explicit gradient blocks are not converted; compute without "
                    + "`gradients=` and let featomic-torch's autograd integration "
                    + "propagate derivatives to positions and cell instead"
                )
        values: List[Optional[torch.Tensor]] = []
        samples: List[Optional[torch.Tensor]] = []
        actual: List[torch.Tensor] = []
        expected: List[torch.Tensor] = []
        reshaped: List[int] = []
        for t in range(len(self._keys)):
            if slots[t] < 0:
                values.append(None)
                samples.append(None)
                continue
            block = tensor.block_by_id(slots[t])
            value = block.values
            l = self._slot_l[t]
            if value.dim() != 3 or value.shape[1] != 2 * l + 1:
                raise ValueError(
                    self._name(t) + " has o3_mu components "
                    + str(int_list(block.components[0].values)) + " (values of shape "
                    + str(value.shape) + "), expected -" + str(l) + ".." + str(l)
                )
            if t == 0 or values[0] is None:
                floating = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
                if self._e3nn_basis and value.dtype not in floating:
                    raise ValueError(
                        "the input has " + dtype_name(value.dtype) + " values: the e3nn basis "
                        + "change needs floating point values (use basis='featomic' "
                        + "for integers)"
                    )
            if value.shape[2] != self._slot_n_properties[t]:
                value = self._expand_properties(t, value, block.properties.values)
                reshaped.append(t)
            elif self._check:
                p0 = self._property_start[t]
                actual.append(block.properties.values.reshape(-1))
                expected.append(self._properties[p0 : self._property_start[t + 1]])
            if self._check:
                actual.append(block.components[0].values.reshape(-1))
                expected.append(self._mu[l * l : (l + 1) * (l + 1)])
            values.append(value)
            samples.append(block.samples.values)
        return values, samples, actual, expected, reshaped

    def _expand_properties(
        self, t: int, value: torch.Tensor, properties: torch.Tensor
    ) -> torch.Tensor:
        """Values of a block whose properties are a subset (in any order) of the
        template's, placed at the template's properties (zeros elsewhere)."""
        p0 = self._property_start[t]
        n_dims = len(self._property_names)
        template = self._properties[p0 : self._property_start[t + 1]].reshape(-1, n_dims)
        equal = (properties.unsqueeze(1) == template.unsqueeze(0)).all(dim=2)
        found = equal.any(dim=1)
        if not bool(found.all()):
            i = int(torch.nonzero(~found)[0, 0])
            raise ValueError(
                self._name(t) + " has property "
                + describe(self._property_names, entry(properties, i))
                + " which is not in the template"
            )
        index = equal.to(torch.int32).argmax(dim=1)
        full = torch.zeros(
            (value.shape[0], value.shape[1], template.shape[0]),
            dtype=value.dtype,
            device=value.device,
        )
        return full.index_copy(2, index, value)

    def _explain(
        self,
        tensor: TensorMap,
        slots: List[int],
        values: List[Optional[torch.Tensor]],
        reshaped: List[int],
    ) -> None:
        """The batched comparison failed: find the culprit, block by block. Blocks
        whose properties are the template's in another order are re-placed."""
        for t in range(len(self._keys)):
            if slots[t] < 0:
                continue
            block = tensor.block_by_id(slots[t])
            l = self._slot_l[t]
            mu = block.components[0].values.reshape(-1)
            if not torch.equal(mu, self._mu[l * l : (l + 1) * (l + 1)]):
                raise ValueError(
                    self._name(t) + " has o3_mu components "
                    + str(int_list(mu)) + ", expected -" + str(l)
                    + ".." + str(l) + " in increasing order"
                )
            if t in reshaped:  # already placed at the template's properties
                continue
            p0 = self._property_start[t]
            properties = block.properties.values
            if not torch.equal(
                properties.reshape(-1), self._properties[p0 : self._property_start[t + 1]]
            ):
                value = values[t]
                assert value is not None
                values[t] = self._expand_properties(t, value, properties)

    # ------------------------------------------------------------------ rows

    def _classes(
        self,
        values: List[Optional[torch.Tensor]],
        samples: List[Optional[torch.Tensor]],
        actual: List[torch.Tensor],
        expected: List[torch.Tensor],
    ) -> Tuple[List[List[List[int]]], bool, Optional[torch.Tensor]]:
        """For every row group, its present blocks split in classes holding the same
        samples; whether the metadata comparisons (``actual`` against ``expected``)
        found a difference; and, when every group has one length of blocks, the order
        of the rows (with ``check``, sorted here to find repeated samples in the same
        read). One host read for all of it.

        Within a group, blocks of one length are compared with the first of that
        length. With ``check=False``, a group whose blocks all have one length is
        taken to share its samples without comparing them: featomic's blocks of one
        center type hold subsets of the atoms of that type, and one of them (the
        center type with itself) holds them all."""
        classes: List[List[List[int]]] = []
        pairs: List[List[int]] = []  # [block, block of the same length compared to]
        for g in range(len(self._group_slots)):
            lengths: List[int] = []
            group: List[List[int]] = []
            for t in self._group_slots[g]:
                v = values[t]
                if v is not None:
                    n = int(v.shape[0])
                    if n in lengths:
                        group[lengths.index(n)].append(t)
                    else:
                        lengths.append(n)
                        group.append([t])
            if self._check or len(lengths) > 1:
                for members in group:
                    for t in members[1:]:
                        pairs.append([t, members[0]])
            classes.append(group)
        if len(pairs) == 0 and not self._check:
            return classes, False, None
        device = self._columns.device
        order: Optional[torch.Tensor] = None
        single = True
        for group in classes:
            if len(group) > 1:
                single = False
        flags: List[torch.Tensor] = []
        if len(actual) > 0:
            flags.append((torch.cat(actual) != torch.cat(expected)).sum().reshape(1))
        else:
            flags.append(torch.zeros(1, dtype=torch.int64, device=device))
        if self._check:
            # repeated samples in the first block of every class (blocks of one
            # length) of every group; blocks later split off their class are
            # checked with the union of their group's samples (_unions)
            sorted_rows, repeated = self._order_and_repeats(samples, classes)
            flags.append(repeated)
            if single:
                order = sorted_rows
        hashed: List[int] = []
        if len(pairs) > 0:
            mine: List[torch.Tensor] = []
            theirs: List[torch.Tensor] = []
            sizes: List[int] = []
            for pair in pairs:
                s = samples[pair[0]]
                r = samples[pair[1]]
                assert s is not None and r is not None
                mine.append(s)
                theirs.append(r)
                sizes.append(s.shape[0])
                hashed.append(pair[0])
            segment = torch.repeat_interleave(
                torch.tensor(sizes, device=device), output_size=sum(sizes)
            )
            rows = torch.cat(mine)
            different = (rows != torch.cat(theirs)).any(dim=1)
            # a hash of each compared block's set of samples, to split the blocks that
            # differ from the first of their length into classes (checked exactly later)
            code = (rows * self._hash_weights[: rows.shape[1]]).sum(dim=1)
            mixed = torch.stack([different.to(torch.int64), code * (code + 1442695040888963407)])
            per_pair = torch.zeros((2, len(pairs)), dtype=torch.int64, device=device)
            flags.append(per_pair.index_add_(1, segment, mixed).reshape(-1))
        read = host_read(torch.cat(flags))
        if self._check:
            if read[1] != 0:
                self._explain_duplicates(samples, classes)
            read = read[:1] + read[2:]
        different = read[0] != 0
        if len(pairs) == 0 or max(read[1 : 1 + len(pairs)]) == 0:
            return classes, different, order
        # blocks of equal length holding other samples: classes by (length, hash of
        # the samples), verified exactly with the union of the samples (_groups)
        hashes = read[1 + len(pairs) :]
        hash_of: List[int] = [0] * len(values)
        has_hash: List[bool] = [False] * len(values)
        for i in range(len(hashed)):
            hash_of[hashed[i]] = hashes[i]
            has_hash[hashed[i]] = True
        for g in range(len(classes)):
            split: List[List[int]] = []
            signatures: List[str] = []
            for members in classes[g]:
                for t in members:
                    v = values[t]
                    assert v is not None
                    signature = str(v.shape[0])
                    if has_hash[t]:
                        signature += ":" + str(hash_of[t])
                    if signature in signatures:
                        split[signatures.index(signature)].append(t)
                    else:
                        signatures.append(signature)
                        split.append([t])
            classes[g] = split
        return classes, different, None

    def _order_and_repeats(
        self, samples: List[Optional[torch.Tensor]], classes: List[List[List[int]]]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first block of every class side by side, sorted (when every group
        has one class: the order of the rows) and ``[1]``: how many samples repeat
        within one class, found next to each other once sorted."""
        device = self._columns.device
        references: List[torch.Tensor] = []
        sizes: List[int] = []
        for group in classes:
            for members in group:
                r = samples[members[0]]
                assert r is not None
                references.append(r)
                sizes.append(r.shape[0])
        total = sum(sizes)
        if total < 2:
            order = torch.arange(total, device=device)
            return order, torch.zeros(1, dtype=torch.int64, device=device)
        rows = torch.cat(references)
        order = lexsort(rows)
        ordered = rows.index_select(0, order)
        group = torch.repeat_interleave(
            torch.tensor(sizes, device=device), output_size=total
        ).index_select(0, order)
        repeated = (ordered[1:] == ordered[:-1]).all(dim=1) & (group[1:] == group[:-1])
        return order, repeated.sum().reshape(1)

    def _explain_duplicates(
        self, samples: List[Optional[torch.Tensor]], classes: List[List[List[int]]]
    ) -> None:
        for group in classes:
            for members in group:
                r = samples[members[0]]
                assert r is not None
                if r.shape[0] > 1:
                    ordered = r.index_select(0, lexsort(r))
                    same = (ordered[1:] == ordered[:-1]).all(dim=1)
                    if bool(same.any()):
                        i = int(torch.nonzero(same)[0, 0])
                        raise ValueError(
                            self._name(members[0]) + " has the sample "
                            + describe(self._sample_names, entry(ordered, i))
                            + " more than once"
                        )

    def _groups(
        self,
        values: List[Optional[torch.Tensor]],
        samples: List[Optional[torch.Tensor]],
        classes: List[List[List[int]]],
        with_values: bool,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Per row group: the blocks side by side, the column map (both only
        ``with_values``), the sample values."""
        device = self._columns.device
        dtype = torch.float64  # when no block is present
        for v in values:
            if v is not None:
                dtype = v.dtype
                break
        n_sample_dims = len(self._sample_names)
        groups: List[torch.Tensor] = []
        columns: List[torch.Tensor] = []
        rows: List[torch.Tensor] = []
        flat: List[torch.Tensor] = []
        unions, union_ids, exact = self._unions(samples, classes)
        if not exact:
            # blocks of one class differ: compare them one by one
            self._exact_classes(samples, classes)
            unions, union_ids, exact = self._unions(samples, classes)
        for g in range(len(self._group_slots)):
            group = classes[g]
            if len(group) == 0:
                groups.append(torch.zeros((0, 1), dtype=dtype, device=device))
                columns.append(torch.zeros(self._dim, dtype=torch.int64, device=device))
                rows.append(torch.zeros((0, n_sample_dims), dtype=torch.int32, device=device))
                continue
            if not with_values:
                if len(group) == 1:
                    reference = samples[group[0][0]]
                    assert reference is not None
                    rows.append(reference)
                else:
                    rows.append(unions[g])
                continue
            order: List[int] = []
            flat = []
            if len(group) == 1:
                for t in group[0]:
                    v = values[t]
                    assert v is not None
                    flat.append(v.reshape(v.shape[0], v.shape[1] * v.shape[2]))
                    order.append(t)
                reference = samples[group[0][0]]
                assert reference is not None
                rows.append(reference)
                n_rows = reference.shape[0]
            else:
                union = unions[g]
                ids = union_ids[g]
                rows.append(union)
                n_rows = union.shape[0]
                start = 0
                for c in range(len(group)):
                    parts: List[torch.Tensor] = []
                    for t in group[c]:
                        v = values[t]
                        assert v is not None
                        parts.append(v.reshape(v.shape[0], v.shape[1] * v.shape[2]))
                        order.append(t)
                    part = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
                    reference = samples[group[c][0]]
                    assert reference is not None
                    n = reference.shape[0]
                    expanded = torch.zeros(
                        (n_rows, part.shape[1]), dtype=part.dtype, device=part.device
                    )
                    flat.append(expanded.index_put_((ids[start : start + n],), part))
                    start += n
            full = order == self._group_slots[g]
            if self._group_holes[g] or not full:
                flat.append(torch.zeros((n_rows, 1), dtype=dtype, device=device))
            groups.append(torch.cat(flat, dim=1) if len(flat) > 1 else flat[0])
            if full:
                columns.append(self._columns[g])
            else:
                columns.append(self._remap(g, order).index_select(0, self._columns[g]))
        return groups, columns, rows

    def _unions(
        self, samples: List[Optional[torch.Tensor]], classes: List[List[List[int]]]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], bool]:
        """For every row group whose blocks hold different samples: the sorted union
        of its samples, and the row of the union of every sample of its classes (in
        class order). One host read for all groups: the size of each union, and the
        exact comparison of every block with the first of its class."""
        device = self._columns.device
        unions: List[torch.Tensor] = []
        union_ids: List[torch.Tensor] = []
        tagged: List[torch.Tensor] = []
        mine: List[torch.Tensor] = []
        theirs: List[torch.Tensor] = []
        multi: List[int] = []
        for g in range(len(classes)):
            # placeholders for groups without a union (never read)
            unions.append(self._mu)
            union_ids.append(self._mu)
            if len(classes[g]) < 2:
                continue
            k = len(multi)
            multi.append(g)
            for members in classes[g]:
                r = samples[members[0]]
                assert r is not None
                tag = torch.full((r.shape[0], 1), k, dtype=r.dtype, device=device)
                which = torch.full((r.shape[0], 1), len(tagged), dtype=r.dtype, device=device)
                tagged.append(torch.cat([tag, r, which], dim=1))
                for t in members[1:]:
                    s = samples[t]
                    assert s is not None
                    mine.append(s.reshape(-1))
                    theirs.append(r.reshape(-1))
        if len(multi) == 0:
            return unions, union_ids, True
        # rows [group, samples..., class]: sorted, a sample repeated within a class
        # is next to itself
        everything = torch.cat(tagged)
        n_columns = everything.shape[1]
        _, ordered, new, ids = sorted_runs(everything, n_columns - 1)
        counts = torch.zeros(len(multi), dtype=torch.int64, device=device).index_add_(
            0, ordered[:, 0].to(torch.int64), new.to(torch.int64)
        )
        flags = [counts, (ordered[1:] == ordered[:-1]).all(dim=1).sum().reshape(1)]
        if len(mine) > 0:
            flags.append((torch.cat(mine) != torch.cat(theirs)).sum().reshape(1))
        read = host_read(torch.cat(flags))
        if read[len(multi)] != 0:
            self._explain_duplicates(samples, classes)
        if len(mine) > 0 and read[-1] != 0:
            # the same samples in another order (or a hash collision)
            return unions, union_ids, False
        total = sum(read[: len(multi)])
        where = torch.nonzero_static(new, size=total)[:, 0]
        distinct = ordered.index_select(0, where)[:, 1 : n_columns - 1]
        start = 0
        entry_start = 0
        for k in range(len(multi)):
            g = multi[k]
            n = read[k]
            unions[g] = distinct[start : start + n]
            n_entries = 0
            for members in classes[g]:
                r = samples[members[0]]
                assert r is not None
                n_entries += r.shape[0]
            union_ids[g] = ids[entry_start : entry_start + n_entries] - start
            start += n
            entry_start += n_entries
        return unions, union_ids, True

    def _exact_classes(
        self, samples: List[Optional[torch.Tensor]], classes: List[List[List[int]]]
    ) -> List[List[List[int]]]:
        """Classes of blocks holding exactly the same samples, in the same order,
        compared block by block (inputs whose blocks list one set of samples in
        different orders)."""
        exact: List[List[List[int]]] = []
        for group in classes:
            split: List[List[int]] = []
            for members in group:
                for t in members:
                    s = samples[t]
                    assert s is not None
                    placed = False
                    for c in range(len(split)):
                        r = samples[split[c][0]]
                        assert r is not None
                        if r.shape == s.shape and torch.equal(r, s):
                            split[c].append(t)
                            placed = True
                            break
                    if not placed:
                        split.append([t])
            exact.append(split)
        classes.clear()
        for group in exact:
            classes.append(group)
        return classes

    def _remap(self, g: int, order: List[int]) -> torch.Tensor:
        """``[width + 1]``: for every column of group g's blocks side by side in
        template order (and its zero column), the column of the same value when the
        present blocks are placed in ``order``."""
        slots = self._group_slots[g]
        n_columns = self._group_width[g] + 1
        new_start: List[int] = []
        total = 0
        for t in order:
            total += (2 * self._slot_l[t] + 1) * self._slot_n_properties[t]
        for t in slots:
            new_start.append(total)  # absent: the zero column
        widths: List[int] = []
        for t in slots:
            widths.append((2 * self._slot_l[t] + 1) * self._slot_n_properties[t])
        start = 0
        for t in order:
            new_start[slots.index(t)] = start
            start += (2 * self._slot_l[t] + 1) * self._slot_n_properties[t]
        present: List[bool] = []
        for t in slots:
            present.append(t in order)
        widths.append(1)
        new_start.append(total)
        present.append(False)
        k = torch.repeat_interleave(
            torch.arange(len(widths)), torch.tensor(widths), output_size=n_columns
        )
        w = torch.tensor(widths)
        first = torch.cumsum(w, dim=0) - w
        offset = torch.arange(n_columns) - first.index_select(0, k)
        starts = torch.tensor(new_start).index_select(0, k)
        remap = torch.where(
            torch.tensor(present).index_select(0, k), starts + offset, torch.full_like(k, total)
        )
        return remap.to(self._columns.device)

    def _row_values(self, rows: List[torch.Tensor]) -> torch.Tensor:
        """All rows, samples then row keys, groups one after the other."""
        parts: List[torch.Tensor] = []
        for g in range(len(rows)):
            r = rows[g]
            key = torch.tensor(self._group_keys[g], dtype=torch.int32, device=r.device)
            parts.append(
                torch.cat([r, key.unsqueeze(0).expand(r.shape[0], key.shape[0])], dim=1)
            )
        return torch.cat(parts)

    def _caller_order(self, rows: List[torch.Tensor], wanted: Labels) -> torch.Tensor:
        """The source row of every entry of ``wanted`` (the zero row when absent);
        an error for rows of the tensor that ``wanted`` lacks."""
        names = wanted.names
        if wanted.values.device != self._device.device:
            raise ValueError(
                "the rows are on " + str(wanted.values.device) + ", the input on "
                + str(self._device.device) + ": move them with rows.to(device)"
            )
        n_sample_dims = len(self._sample_names)
        all_names = self._sample_names + self._row_key_names
        columns: List[int] = []
        for name in names:
            if name not in all_names:
                raise ValueError(
                    "rows have the dimension '" + name + "', which is neither a sample "
                    + "dimension " + str(self._sample_names) + " nor a row key "
                    + str(self._row_key_names)
                )
            columns.append(all_names.index(name))
        for name in self._sample_names:
            if name not in names:
                raise ValueError(
                    "rows " + str(names) + " lack the sample dimension '" + name + "'"
                )
        everything = self._row_values(rows)
        source = everything[:, columns]
        matched, uses = join(source, wanted.values)
        n_source = source.shape[0]
        # one host read: rows of the tensor that `wanted` lacks (unless they are
        # dropped on purpose), or that it cannot tell apart (without the row-key
        # columns, one sample in two row groups)
        if self._drop_unlisted:
            missing = torch.zeros(0, dtype=torch.bool, device=source.device)
        else:
            missing = uses == 0
        shared = torch.zeros(0, dtype=torch.bool, device=source.device)
        ordered = source
        if len(columns) < len(all_names) and n_source > 1:
            # rows lacking some row-key columns: two rows of the tensor that differ
            # only there would be one entry of `rows`
            ordered = source.index_select(0, lexsort(source))
            shared = (ordered[1:] == ordered[:-1]).all(dim=1)
        verdict = torch.cat([missing, shared])
        if verdict.shape[0] > 0 and bool(verdict.any()):
            if bool(missing.any()):
                i = int(torch.nonzero(missing)[0, 0])
                raise ValueError(
                    "the tensor has the row "
                    + describe(all_names, entry(everything, i))
                    + ", which is not in `rows`: it would be dropped (build the "
                    + "module with unlisted_rows='drop' to take only the rows listed)"
                )
            i = int(torch.nonzero(shared)[0, 0])
            given: List[str] = []
            for c in columns:
                given.append(all_names[c])
            lacking: List[str] = []
            for name in self._row_key_names:
                if name not in names:
                    lacking.append(name)
            raise ValueError(
                "`rows` lack the row-key column(s) " + str(lacking) + ", and the "
                + "tensor has several rows with " + describe(given, entry(ordered, i))
                + " (in several row groups): give `rows` the row-key columns "
                + str(self._row_key_names)
            )
        return torch.where(matched >= 0, matched, torch.full_like(matched, n_source))

    @torch.jit.export
    def read(
        self, tensor: TensorMap, wanted: Optional[Labels], with_values: bool = True
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        """Per row group the blocks side by side and the column map (none without
        ``with_values``: for the rows' metadata alone), the order of the rows, and
        the sample values of each group."""
        device = tensor.keys.values.device
        if device != self._device.device:
            raise ValueError(
                "the input is on " + str(device) + ", the module on "
                + str(self._device.device) + ": move the module with .to()"
            )
        self._follow_device()
        slots = self._match_keys(tensor.keys)
        values, samples, actual, expected, reshaped = self._values(tensor, slots)
        classes, different, sorted_order = self._classes(values, samples, actual, expected)
        if different:
            self._explain(tensor, slots, values, reshaped)
        groups, columns, rows = self._groups(values, samples, classes, with_values)
        if wanted is None:
            if sorted_order is not None:
                order = sorted_order
            else:
                everything = torch.cat(rows)
                if everything.shape[0] == 0:
                    order = torch.zeros(0, dtype=torch.int64, device=self._columns.device)
                else:
                    order = lexsort(everything)
        else:
            order = self._caller_order(rows, wanted)
        if wanted is not None and with_values:
            # the row of zeros for the entries the tensor does not have
            groups.append(torch.zeros((1, 1), dtype=groups[0].dtype, device=groups[0].device))
            columns.append(torch.zeros(self._dim, dtype=torch.int64, device=groups[0].device))
        return groups, columns, order, rows

    @torch.jit.export
    def labels(self, rows: List[torch.Tensor], order: torch.Tensor) -> Labels:
        values = self._row_values(rows).index_select(0, order)
        return Labels(self._sample_names + self._row_key_names, values, assume_unique=True)


class TensorMapToIrreps(torch.nn.Module):
    r"""Convert a :py:class:`~metatensor.torch.TensorMap` of spherical tensors (as
    produced by featomic's ``SphericalExpansion``, ``LodeSphericalExpansion``,
    ``SphericalExpansionByPair`` or λ-SOAP) to a flat ``[n_rows, irreps_out.dim]``
    tensor for e3nn.

    The layout is planned once from the metadata of ``template``:

    - one irrep per ``(o3_lambda, o3_sigma)``, with parity
      ``p = o3_sigma * (-1) ** o3_lambda``, in e3nn's order;
    - the ``row_keys`` key dimensions (default: whichever of ``center_type``,
      ``first_atom_type``, ``second_atom_type`` the template has) move to rows, which
      are the union of all blocks' samples in lexicographic order, or the caller's
      ``rows``;
    - every other key dimension (e.g. ``neighbor_type``) moves to channels, ordered by
      (key values, then property entries), the union over the template's blocks;
    - absent blocks and absent entries are zeros; keys are matched by value.

    ``forward`` reads the batch's metadata (TorchScript-compiled, outside
    ``torch.compile`` graphs), then moves the values with a constant number of tensor
    operations: per row group one ``cat`` of its blocks and one ``gather`` with the
    planned column map, one row ``index_select``, one GEMM per l >= 2 segment for the
    e3nn basis.

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
        Key dimensions moved to rows.
    check : bool
        Compare every block's ``o3_mu`` components and property values with the
        template's, and, within a row group, the samples of blocks of equal length
        (default; their verdict is one host read beside the read of the keys; on a
        GPU, uploading two small tables of block sizes synchronises too; a batch
        whose blocks of one row group hold different samples costs one read more,
        with or without ``check``). ``check=False`` trusts that the
        input comes from the template's producer: featomic, whose blocks of one row
        group hold subsets of the same samples, so that equal lengths mean equal
        samples.
    unlisted_rows : {"error", "drop"}
        What ``forward(tensor, rows)`` does with rows of ``tensor`` that ``rows``
        does not list: ``"error"`` (default: nothing is dropped unnoticed) or
        ``"drop"``, to take exactly the rows listed, e.g. a GNN's edge list without
        the self-pairs ``(i, i, 0, 0, 0)`` of featomic's
        ``SphericalExpansionByPair``, or a selection of atoms.

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
    >>> # rows in the caller's order, zeros for rows the tensor does not have
    >>> wanted = Labels(["system", "atom"], torch.tensor([[0, 1], [0, 5], [0, 0]]))
    >>> z = to_irreps(tensor, wanted)
    >>> torch.equal(z[0], x[1]), bool(z[1].abs().sum() == 0), torch.equal(z[2], x[0])
    (True, True, True)
    """

    _rotations: List[List[int]]
    _basis: torch.Tensor

    def __init__(
        self,
        template: TensorMap,
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
        row_keys: Optional[Sequence[str]] = None,
        check: bool = True,
        unlisted_rows: str = "error",
    ):
        super().__init__()
        self.basis = check_option("basis", basis, BASES)
        self.layout = check_option("layout", layout, LAYOUTS)
        self.unlisted_rows = check_option("unlisted_rows", unlisted_rows, UNLISTED_ROWS)
        self._setup(Layout.from_tensor_map(template, row_keys), check)

    def _setup(self, plan: Layout, check: bool) -> None:
        self.plan = plan
        self.check = check
        self.irreps_out = plan.irreps_e3nn
        self._e3nn_basis = self.basis == "e3nn"
        self._mul_ir = self.layout == "mul_ir"
        self._read = self._script_read()
        basis, rotations = basis_tables(
            [(s.l, s.mul, s.offset) for s in plan.segments] if self._e3nn_basis else []
        )
        # float64 whatever the casts (cast to the input's dtype per call), and out of
        # the state_dict: a plain attribute, moved by ``_apply`` (eager) or at the
        # next call (scripted, ``_follow_device``)
        self._basis = basis
        self._rotations = rotations

    def _script_read(self) -> torch.jit.ScriptModule:
        columns = self.plan.column_map(self.basis, self.layout)
        return torch.jit.script(
            _ReadTensorMap(
                self.plan, columns, self._e3nn_basis, self.check, self.unlisted_rows == "drop"
            )
        )

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._basis = self._basis.to(device=self._read._device.device)
        return self

    def __getstate__(self):
        # the scripted metadata step does not pickle: rebuilt from the plan
        state = self.__dict__.copy()
        state["_modules"] = {k: v for k, v in self._modules.items() if k != "_read"}
        state["_read_device"] = self._read._device.device
        return state

    def __setstate__(self, state):
        device = state.pop("_read_device")
        super().__setstate__(state)
        self._read = self._script_read().to(device)

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
        unlisted_rows: str = "error",
    ) -> "TensorMapToIrreps":
        """The layout of a featomic-torch ``SphericalExpansion``,
        ``LodeSphericalExpansion`` or ``SphericalExpansionByPair`` for a batch
        containing every pair of ``atom_types``, read from ``calculator.parameters``
        without computing."""
        from ._calculator import template_from_calculator

        template = template_from_calculator(calculator, atom_types)
        return cls(
            template,
            basis=basis,
            layout=layout,
            row_keys=row_keys,
            check=check,
            unlisted_rows=unlisted_rows,
        )

    @torch.jit.unused
    def inverse(self):
        """The :py:class:`IrrepsToTensorMap` undoing this conversion."""
        from ._to_tensor_map import IrrepsToTensorMap

        return IrrepsToTensorMap._from_plan(
            self.plan, basis=self.basis, layout=self.layout, check=self.check
        )

    @torch.jit.unused
    def keys(self) -> Labels:
        """Keys of the planned layout (the template's keys)."""
        return self.plan.keys()

    def extra_repr(self) -> str:
        return f"{self.irreps_out}, basis={self.basis}, layout={self.layout}"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"

    # ------------------------------------------------------------------ forward

    @torch.jit.unused
    def _read_outside_graph(
        self, tensor: TensorMap, rows: Optional[Labels], with_values: bool
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        return _read_batch(self._read, tensor, rows, with_values)

    def _read_batch(
        self, tensor: TensorMap, rows: Optional[Labels], with_values: bool = True
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        if torch.jit.is_scripting():
            result = self._read.read(tensor, rows, with_values)
            self._follow_device(result[2].device)
            return result
        return self._read_outside_graph(tensor, rows, with_values)

    def _follow_device(self, device: torch.device) -> None:
        """Scripted modules: ``.to()`` moves buffers only; the change of basis follows
        the metadata step's device at the next call (eager modules: ``_apply``)."""
        if self._basis.device != device:
            self._basis = self._basis.to(device)

    def move(
        self, groups: List[torch.Tensor], columns: List[torch.Tensor], order: torch.Tensor
    ) -> torch.Tensor:
        """The data step alone, pure tensor code: gather each row group's columns,
        the rows, then the change of basis (``torch.compile(fullgraph=True)``
        accepts it)."""
        parts: List[torch.Tensor] = []
        for g in range(len(groups)):
            group = groups[g]
            # a gather with the column map broadcast over the rows (much faster on
            # the CPU than index_select along dimension 1)
            index = columns[g].unsqueeze(0).expand(group.shape[0], columns[g].shape[0])
            parts.append(torch.gather(group, 1, index))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = out.index_select(0, order)
        if self._e3nn_basis:
            out = rotate(out, self._basis, self._rotations, self._mul_ir, False)
        return out

    def forward(self, tensor: TensorMap, rows: Optional[Labels] = None) -> torch.Tensor:
        """The ``[n_rows, irreps_out.dim]`` tensor of ``tensor``; rows as
        :py:meth:`samples`, or one per entry of ``rows`` (``Labels`` with the
        template's sample names, optionally the row-key columns too) in that order,
        zeros for entries the tensor does not have. A row of the tensor missing
        from ``rows`` is an error, or dropped with ``unlisted_rows="drop"``."""
        groups, columns, order, _ = self._read_batch(tensor, rows)
        return self.move(groups, columns, order)

    @torch.jit.export
    def samples(self, tensor: TensorMap) -> Labels:
        """Metadata of the rows of ``forward(tensor)``: the block sample dimensions,
        then the key dimensions moved to rows."""
        _, _, order, rows = self._read_batch(tensor, None, False)
        return self._labels(rows, order)

    def _labels(self, rows: List[torch.Tensor], order: torch.Tensor) -> Labels:
        if torch.jit.is_scripting():
            return self._read.labels(rows, order)
        return self._labels_eager(rows, order)

    @torch.jit.unused
    def _labels_eager(self, rows: List[torch.Tensor], order: torch.Tensor) -> Labels:
        return _labels(self._read, rows, order)

    @torch.jit.export
    def forward_with_samples(self, tensor: TensorMap) -> Tuple[torch.Tensor, Labels]:
        """``(forward(tensor), samples(tensor))`` with the metadata read once."""
        groups, columns, order, rows = self._read_batch(tensor, None)
        return self.move(groups, columns, order), self._labels(rows, order)


@torch.compiler.disable
def _read_batch(read, tensor: TensorMap, rows: Optional[Labels], with_values: bool):
    """The metadata step, outside any ``torch.compile`` graph (metatensor's classes
    are TorchScript objects dynamo cannot trace); the batch dimensions of what it
    returns are marked dynamic, so that new batch sizes do not recompile."""
    groups, columns, order, row_values = call_scripted(read.read, tensor, rows, with_values)
    for g in groups:
        torch._dynamo.maybe_mark_dynamic(g, 0)
        torch._dynamo.maybe_mark_dynamic(g, 1)
    torch._dynamo.maybe_mark_dynamic(order, 0)
    return groups, columns, order, row_values


@torch.compiler.disable
def _labels(read, rows: List[torch.Tensor], order: torch.Tensor) -> Labels:
    return read.labels(rows, order)
