"""``LodeSphericalExpansion``: featomic's LODE spherical expansion in PyTorch.

The k-space sum of featomic's ``LodeSphericalExpansion``, computed with torch
operations on the systems' device and dtype, differentiable with respect to positions
and cell (double backward included), scriptable with TorchScript. The radial integral
and the Fourier transform of the density live in ``_lode_radial.py``; this module
enumerates the k-vectors, builds the structure factors and the spherical harmonics,
sums over k in chunks, and lays the result out as featomic's ``TensorMap`` (or, through
:py:meth:`LodeSphericalExpansion.to_irreps`, as a flat e3nn tensor).
"""

import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from e3nn import o3
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

from ._batch import int_list
from ._conventions import BASES, LAYOUTS, change_of_basis, check_option
from ._lode_radial import LodeRadialIntegral, parse_hypers

#: featomic's names for this calculator (``c_name``, as featomic-torch's)
C_NAME = "lode_spherical_expansion"



def _phase(l: int) -> float:
    # real part of i^l combined with the sine/cosine form of the structure factor
    if l % 2 == 0:
        return float((-1) ** (l // 2))
    return float((-1) ** ((l + 1) // 2))


def k_vectors(cells: torch.Tensor, k_cutoff: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer coordinates of featomic's k-vectors for each cell.

    The reciprocal lattice points ``n1 b1 + n2 b2 + n3 b3`` of the half-space featomic
    keeps (``n1 > 0``, or ``n1 = 0, n2 > 0``, or ``n1 = n2 = 0, n3 > 0``), within
    featomic's bounds on ``|n_i|``, with a norm strictly below ``k_cutoff``; computed
    in float64 on the CPU, as featomic does.

    Parameters
    ----------
    cells : torch.Tensor
        ``[n_systems, 3, 3]`` cells (rows are the lattice vectors), float64 on the CPU.
    k_cutoff : float
        The k-space cutoff.

    Returns
    -------
    n : torch.Tensor
        ``[n_systems, max_k, 3]`` int64 coordinates, padded with copies of each
        system's first k-vector.
    mask : torch.Tensor
        ``[n_systems, max_k]`` boolean, ``False`` on the padding.

    >>> n, mask = k_vectors(torch.eye(3, dtype=torch.float64)[None] * 2 * math.pi, 1.2)
    >>> n[0][mask[0]].tolist()
    [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    """
    reciprocal = 2.0 * math.pi * torch.linalg.inv(cells.transpose(1, 2))
    m = reciprocal @ reciprocal.transpose(1, 2)
    volume = torch.linalg.det(reciprocal)
    bounds = torch.stack(
        [
            torch.sqrt(m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 1, 2]),
            torch.sqrt(m[:, 2, 2] * m[:, 0, 0] - m[:, 2, 0] * m[:, 2, 0]),
            torch.sqrt(m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 0, 1]),
        ],
        dim=1,
    )
    bounds = (bounds / volume[:, None] * k_cutoff).to(torch.int64)  # truncation, as Rust's `as`
    largest = bounds.max(dim=0).values
    n1 = torch.arange(0, int(largest[0]) + 1)
    n2 = torch.arange(-int(largest[1]), int(largest[1]) + 1)
    n3 = torch.arange(-int(largest[2]), int(largest[2]) + 1)
    grid = torch.cartesian_prod(n1, n2, n3).reshape(-1, 3)
    half = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0))
    half = half | ((grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0))
    grid = grid[half]
    inside = (grid.abs()[None, :, :] <= bounds[:, None, :]).all(dim=2)
    k = grid.to(torch.float64) @ reciprocal  # [n_systems, n_grid, 3]
    inside = inside & ((k * k).sum(dim=2) < k_cutoff * k_cutoff)
    counts = inside.sum(dim=1)
    max_k = int(counts.max()) if counts.numel() > 0 else 0
    n_systems = cells.shape[0]
    n = torch.zeros((n_systems, max_k, 3), dtype=torch.int64)
    mask = torch.zeros((n_systems, max_k), dtype=torch.bool)
    found = torch.nonzero(inside)
    system = found[:, 0]
    index = found[:, 1]
    if index.numel() > 0:
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(index.shape[0]) - start[system]
        n[system, slot] = grid[index]
        mask[system, slot] = True
        first = n[:, :1, :].expand(n_systems, max_k, 3)
        n = torch.where(mask[:, :, None], n, first)
    return n, mask


class LodeSphericalExpansion(torch.nn.Module):
    """featomic's ``LodeSphericalExpansion``, computed with torch operations.

    Takes featomic-torch's constructor arguments unchanged and is called like it;
    returns a ``TensorMap`` with featomic's keys (``o3_lambda, o3_sigma, center_type,
    neighbor_type``), samples (``system, atom``), components (``o3_mu``) and properties
    (``n``), in featomic's order and featomic's basis of real spherical harmonics.
    Computed on the systems' device and in their dtype, differentiable with respect to
    positions and cell (forces and stress by autograd, double backward included),
    scriptable with ``torch.jit.script``.

    Parameters
    ----------
    density : dict
        ``{"type": "SmearedPowerLaw", "smearing": float, "exponent": int,
        "center_atom_weight": float (default 1.0)}``.
    basis : dict
        ``{"type": "TensorProduct", "max_angular": int, "radial": {"type": "Gto",
        "max_radial": int, "radius": float}, "spline_accuracy": float or None
        (default 1e-8)}``.
    k_cutoff : float, optional
        The k-space cutoff, ``1.2 * pi / smearing`` by default.
    low_memory : bool, optional
        Recompute each chunk of the k-sum in the backward pass instead of saving its
        ``[atoms, k-vectors]`` intermediates for autograd (``torch.utils.checkpoint``),
        so that memory stays bounded by a chunk. Eager modules only: a scripted
        module saves the intermediates (TorchScript cannot compile checkpointing).

    Examples
    --------
    >>> calculator = LodeSphericalExpansion(
    ...     density={"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
    ...     basis={"type": "TensorProduct", "max_angular": 2,
    ...            "radial": {"type": "Gto", "max_radial": 3, "radius": 3.0}},
    ... )
    >>> calculator
    LodeSphericalExpansion(smearing=1.0, exponent=1, max_angular=2, max_radial=3)
    """

    __jit_unused_properties__ = ["parameters", "c_name"]
    _to_featomic: torch.Tensor

    def __init__(
        self,
        density: Dict,
        basis: Dict,
        k_cutoff: Optional[float] = None,
        *,
        low_memory: bool = False,
    ):
        super().__init__()
        hypers = parse_hypers(density, basis, k_cutoff)
        self._hypers = hypers
        self._json = json.dumps(
            {"density": density, "basis": basis, "k_cutoff": hypers["k_cutoff"]}
        )
        self.radial = LodeRadialIntegral(**hypers)
        self.max_angular: int = int(hypers["max_angular"])
        self.n_radial: int = int(hypers["max_radial"]) + 1
        self.k_cutoff: float = float(hypers["k_cutoff"])
        L = self.max_angular
        self.spherical_harmonics = o3.SphericalHarmonics(
            list(range(L + 1)), normalize=True, normalization="integral"
        )
        # Y_featomic = Y_e3nn @ D, D block-diagonal in l (x_e3nn = D x_featomic)
        to_featomic = torch.block_diag(*[change_of_basis(l) for l in range(L + 1)])
        # a plain float64 attribute (out of state_dict and of casts, as the radial
        # integral's tables), following the systems' device at the next call
        self._to_featomic = to_featomic
        self._phases: List[float] = [_phase(l) for l in range(L + 1)]
        #: number of (atom, k-vector) pairs a chunk of the k-sum holds at once
        self.chunk_size: int = 1 << 20
        #: recompute each chunk of the k-sum in the backward pass (eager only)
        self.low_memory: bool = bool(low_memory)

    # ------------------------------------------------------------------ metadata

    @property
    def parameters(self) -> str:
        """The hyper-parameters as JSON, as featomic-torch's ``parameters``."""
        return self._json

    @property
    def c_name(self) -> str:
        """featomic's registered name of this calculator."""
        return C_NAME

    def extra_repr(self) -> str:
        h = self._hypers
        return (
            f"smearing={h['smearing']}, exponent={h['exponent']}, "
            f"max_angular={h['max_angular']}, max_radial={h['max_radial']}"
        )

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"

    @torch.jit.unused
    def to_irreps(
        self, atom_types: Sequence[int], *, basis: str = "e3nn", layout: str = "mul_ir"
    ) -> "LodeToIrreps":
        """The module computing this expansion straight into a flat e3nn tensor.

        Equal to ``TensorMapToIrreps.from_calculator(self, atom_types, basis=basis,
        layout=layout)(self(systems))``, without building a ``TensorMap``.
        """
        return LodeToIrreps(self, atom_types, basis=basis, layout=layout)

    # ------------------------------------------------------------------ compute

    def _read_batch(
        self, systems: List[System]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """One host read: the cells and the atom types of every system."""
        if len(systems) == 0:
            raise ValueError("LodeSphericalExpansion needs at least one system")
        reference = systems[0].positions
        parts: List[torch.Tensor] = []
        sizes: List[int] = []
        for i, system in enumerate(systems):
            if system.positions.device != reference.device:
                raise ValueError(
                    f"system {i} is on {system.positions.device}, system 0 on "
                    f"{reference.device}: all systems of a batch must share a device"
                )
            if system.positions.dtype != reference.dtype:
                raise ValueError(
                    f"system {i} has dtype {system.positions.dtype}, system 0 "
                    f"{reference.dtype}: all systems of a batch must share a dtype"
                )
            parts.append(system.cell.detach().reshape(-1).to(torch.float64))
            parts.append(system.pbc.to(torch.float64))
            sizes.append(system.positions.shape[0])
        for system in systems:
            parts.append(system.types.to(torch.float64))
        # the batch's one read from the device (marked for torch.profiler, which
        # counts the package's host reads as ``rascaline_e3nn::host_read``)
        with torch.autograd.profiler.record_function("rascaline_e3nn::host_read"):
            host = torch.cat(parts).cpu()
        n_systems = len(systems)
        head = host[: 12 * n_systems].reshape(n_systems, 12)
        cells = head[:, :9].reshape(n_systems, 3, 3)
        pbc = head[:, 9:]
        for i in range(n_systems):
            if not bool(pbc[i].all()) or bool((cells[i] == 0).all()):
                raise ValueError(
                    f"LODE can only be used with periodic systems: system {i} is not "
                    "periodic in every direction"
                )
            if float(torch.linalg.det(cells[i])) == 0.0:
                raise ValueError(f"the cell of system {i} is singular")
        types = host[12 * n_systems :].to(torch.int64)
        return cells, types, sizes

    def _expansion(
        self,
        systems: List[System],
        cells_host: torch.Tensor,
        type_index: torch.Tensor,
        n_types: int,
        sizes: List[int],
        e3nn_basis: bool,
    ) -> List[torch.Tensor]:
        """The expansion of every atom on every neighbour type.

        ``type_index`` (int64, on the CPU, ``[n_atoms]``) is each atom's position
        among the ``n_types`` neighbour types. Returns, per l, a ``[n_atoms, n_types,
        2l+1, n_radial]`` tensor on the systems' device.
        """
        positions = systems[0].positions
        device = positions.device
        dtype = positions.dtype
        n_systems = len(systems)
        max_atoms = max(sizes)
        L = self.max_angular
        n_radial = self.n_radial

        # every index is made on the host and uploaded at once
        n_host, mask_host = k_vectors(cells_host, self.k_cutoff)
        for i in range(n_systems):
            if not bool(mask_host[i].any()):
                raise ValueError(
                    f"No k-vectors for current combination of hyper parameters (system {i})"
                )
        max_k = n_host.shape[1]
        system_host = torch.cat(
            [torch.full([n], i, dtype=torch.int64) for i, n in enumerate(sizes)]
        )
        atom_host = torch.cat([torch.arange(n, dtype=torch.int64) for n in sizes])
        n_atoms = system_host.shape[0]
        upload = torch.cat(
            [
                n_host.reshape(-1),
                mask_host.to(torch.int64).reshape(-1),
                system_host * max_atoms + atom_host,
                system_host,
                type_index,
            ]
        ).to(device)
        n_int = upload[: 3 * n_systems * max_k].reshape(n_systems, max_k, 3)
        start = 3 * n_systems * max_k
        mask = upload[start : start + n_systems * max_k].reshape(n_systems, max_k).to(dtype)
        start += n_systems * max_k
        flat = upload[start : start + n_atoms]
        system_of_atom = upload[start + n_atoms : start + 2 * n_atoms]
        own_type = upload[start + 2 * n_atoms :]

        cells = torch.stack([s.cell for s in systems])
        # inv_ex: no check of the result, which would synchronise a GPU (the cells
        # were checked on the host)
        reciprocal = 2.0 * math.pi * torch.linalg.inv_ex(cells.transpose(1, 2))[0]
        volumes = torch.linalg.det(cells).abs()

        # padded positions and one-hot types, [n_systems, max_atoms, ...]
        all_positions = torch.cat([s.positions for s in systems])
        padded = torch.zeros((n_systems * max_atoms, 3), dtype=dtype, device=device)
        padded = padded.index_copy(0, flat, all_positions).reshape(n_systems, max_atoms, 3)
        # one_hot would check its input's range on the device: a comparison does not
        own = (own_type[:, None] == torch.arange(n_types, device=device)).to(dtype)
        one_hot = torch.zeros((n_systems * max_atoms, n_types), dtype=dtype, device=device)
        one_hot = one_hot.index_copy(0, flat, own).reshape(n_systems, max_atoms, n_types)
        one_hot_t = one_hot.transpose(1, 2)

        self.radial._follow(device)
        if self._to_featomic.device != device:
            self._to_featomic = self._to_featomic.to(device)
        if e3nn_basis:
            to_basis = torch.eye((L + 1) * (L + 1), dtype=dtype, device=device)
        else:
            to_basis = self._to_featomic.to(dtype)
        width_even = 0
        width_odd = 0
        for l in range(L + 1):
            if l % 2 == 0:
                width_even += (2 * l + 1) * n_radial
            else:
                width_odd += (2 * l + 1) * n_radial
        out_even = torch.zeros(
            (n_systems, max_atoms * n_types, width_even), dtype=dtype, device=device
        )
        out_odd = torch.zeros(
            (n_systems, max_atoms * n_types, width_odd), dtype=dtype, device=device
        )
        prefactor = 2.0 * 4.0 * math.pi / volumes  # the other half-space, 4 pi / V

        step = max(1, self.chunk_size // max(1, n_systems * max_atoms))
        for start in range(0, max_k, step):
            stop = min(max_k, start + step)
            n_chunk = n_int[:, start:stop].to(dtype)
            mask_chunk = mask[:, start:stop]
            if self.low_memory and not torch.jit.is_scripting():
                even, odd = self._k_sum_recomputed(
                    n_chunk, mask_chunk, reciprocal, prefactor, padded, one_hot_t, to_basis
                )
            else:
                even, odd = self._k_sum(
                    n_chunk, mask_chunk, reciprocal, prefactor, padded, one_hot_t, to_basis
                )
            out_even = out_even + even
            out_odd = out_odd + odd

        out_even = out_even.reshape(n_systems * max_atoms, n_types, width_even)[flat]
        out_odd = out_odd.reshape(n_systems * max_atoms, n_types, width_odd)[flat]
        result: List[torch.Tensor] = []
        offset_even = 0
        offset_odd = 0
        for l in range(L + 1):
            width = (2 * l + 1) * n_radial
            if l % 2 == 0:
                block = out_even[:, :, offset_even : offset_even + width]
                offset_even += width
            else:
                block = out_odd[:, :, offset_odd : offset_odd + width]
                offset_odd += width
            result.append(block.reshape(n_atoms, n_types, 2 * l + 1, n_radial))

        # l = 0: the k = 0 term (per neighbour of each type) and the centre atom's
        k0 = self.radial.k0_term.to(dtype)
        center = self.radial.center_term.to(dtype)
        counts = one_hot.sum(dim=1)  # [S, T]
        k0_per_atom = (4.0 * math.pi / volumes[:, None] * counts)[system_of_atom]
        scalar = k0_per_atom[:, :, None] * k0[None, None, :] - own[:, :, None] * center
        result[0] = result[0] + scalar[:, :, None, :]
        return result

    def _k_sum(
        self,
        n: torch.Tensor,
        mask: torch.Tensor,
        reciprocal: torch.Tensor,
        prefactor: torch.Tensor,
        positions: torch.Tensor,
        one_hot_t: torch.Tensor,
        to_basis: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One chunk of the k-sum: the even-l and odd-l coefficients of every (atom,
        neighbour type), ``[n_systems, max_atoms * n_types, width]`` each."""
        n_systems = n.shape[0]
        n_chunk = n.shape[1]
        max_atoms = positions.shape[1]
        n_types = one_hot_t.shape[1]
        k = torch.bmm(n, reciprocal)  # [S, Kc, 3]
        k_norm = torch.linalg.vector_norm(k, dim=2).reshape(-1)
        factor = (prefactor[:, None] * mask).reshape(-1)
        factor = factor * self.radial.density_fourier(k_norm)
        harmonics = self.spherical_harmonics(k.reshape(-1, 3)) @ to_basis
        radial = self.radial(k_norm)
        weights_even: List[torch.Tensor] = []
        weights_odd: List[torch.Tensor] = []
        for l in range(self.max_angular + 1):
            y = harmonics[:, l * l : (l + 1) * (l + 1)]
            w = (factor[:, None, None] * self._phases[l]) * y[:, :, None]
            w = (w * radial[l][:, None, :]).reshape(n_systems, n_chunk, -1)
            if l % 2 == 0:
                weights_even.append(w)
            else:
                weights_odd.append(w)

        # structure factors: sum over the atoms j of each type of cos(k.(r_i - r_j))
        # (even l) and sin(k.(r_i - r_j)) (odd l), from per-type sums, O(N K)
        phase = torch.bmm(positions, k.transpose(1, 2))  # [S, N, Kc]
        cos = torch.cos(phase)
        sin = torch.sin(phase)
        sum_cos = torch.bmm(one_hot_t, cos)[:, None, :, :]  # [S, 1, T, Kc]
        sum_sin = torch.bmm(one_hot_t, sin)[:, None, :, :]
        cos = cos[:, :, None, :]
        sin = sin[:, :, None, :]
        shape = (n_systems, max_atoms * n_types, n_chunk)
        real = (cos * sum_cos + sin * sum_sin).reshape(shape)
        even = torch.bmm(real, torch.cat(weights_even, dim=2))
        if len(weights_odd) == 0:
            odd = torch.zeros((n_systems, max_atoms * n_types, 0), dtype=even.dtype, device=even.device)
        else:
            imag = (sin * sum_cos - cos * sum_sin).reshape(shape)
            odd = torch.bmm(imag, torch.cat(weights_odd, dim=2))
        return even, odd

    @torch.jit.unused
    def _k_sum_recomputed(
        self,
        n: torch.Tensor,
        mask: torch.Tensor,
        reciprocal: torch.Tensor,
        prefactor: torch.Tensor,
        positions: torch.Tensor,
        one_hot_t: torch.Tensor,
        to_basis: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``_k_sum`` under ``torch.utils.checkpoint``: recomputed in the backward
        pass instead of saved (``low_memory=True``, eager only)."""
        import torch.utils.checkpoint

        return torch.utils.checkpoint.checkpoint(
            self._k_sum, n, mask, reciprocal, prefactor, positions, one_hot_t, to_basis,
            use_reentrant=False,
        )

    def forward(
        self,
        systems: List[System],
        gradients: Optional[List[str]] = None,
        use_native_system: bool = True,
        selected_samples: Optional[Labels] = None,
        selected_properties: Optional[Labels] = None,
        selected_keys: Optional[Labels] = None,
    ) -> TensorMap:
        """Computes the expansion of ``systems``, as featomic-torch's calculator.

        ``gradients`` must be ``None`` or empty: gradients come from autograd
        (``torch.autograd.grad`` of the values with respect to ``system.positions``
        and ``system.cell``). ``selected_samples``, ``selected_properties`` and
        ``selected_keys`` select as featomic does.
        """
        if gradients is not None and len(gradients) > 0:
            raise ValueError(
                f"explicit gradients {gradients} are not computed: use autograd "
                "(torch.autograd.grad of the values with respect to system.positions "
                "and system.cell), which gives forces and stress"
            )
        if not use_native_system:
            raise ValueError("only `use_native_system=True` is supported")

        cells_host, types_host, sizes = self._read_batch(systems)
        device = systems[0].positions.device
        dtype = systems[0].positions.dtype
        batch_types = torch.unique(types_host)
        n_types = batch_types.shape[0]
        type_index = torch.searchsorted(batch_types, types_host)

        system_host = torch.cat(
            [torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)]
        )
        atom_host = torch.cat([torch.arange(n, dtype=torch.int64) for n in sizes])
        # present[s, t]: system s contains an atom of type t
        present = torch.zeros((len(sizes), n_types), dtype=torch.bool)
        present[system_host, type_index] = True

        # keys: every (center, neighbor) pair occurring in one system, then l
        key_names = ["o3_lambda", "o3_sigma", "center_type", "neighbor_type"]
        pairs = (present[:, :, None] & present[:, None, :]).any(dim=0)
        key_list: List[List[int]] = []
        for a in range(n_types):
            for b in range(n_types):
                if bool(pairs[a, b]):
                    for l in range(self.max_angular + 1):
                        key_list.append([l, 1, int(batch_types[a]), int(batch_types[b])])
        keys_values = torch.tensor(key_list, dtype=torch.int64).reshape(-1, 4)
        if selected_keys is not None:
            if selected_keys.names == key_names:
                # featomic computes exactly the selected keys, present or not
                keys_values = selected_keys.values.to(torch.device("cpu"), torch.int64)
            else:
                # a selection on some of the key columns filters the batch's keys
                keys_values = keys_values[_select(selected_keys, key_names, keys_values)]
        dense = self._expansion(
            systems, cells_host, type_index, n_types, sizes, e3nn_basis=False
        )

        sample_mask = torch.ones(system_host.shape[0], dtype=torch.bool)
        if selected_samples is not None:
            sample_mask = _select(
                selected_samples, ["system", "atom"], torch.stack([system_host, atom_host], 1)
            )
        property_index: Optional[torch.Tensor] = None
        if selected_properties is not None:
            if selected_properties.names != ["n"]:
                raise ValueError(
                    f"selected_properties must have the single column 'n', got "
                    f"{selected_properties.names}"
                )
            # in the selection's order, as featomic
            property_index = selected_properties.values.to(torch.device("cpu"), torch.int64)
            property_index = property_index.reshape(-1)
            if bool(((property_index < 0) | (property_index >= self.n_radial)).any()):
                raise ValueError(
                    f"selected_properties has values of n outside 0..{self.n_radial - 1}"
                )

        samples_by_pair: Dict[str, Tuple[Labels, torch.Tensor]] = {}
        blocks: List[TensorBlock] = []
        for i in range(keys_values.shape[0]):
            l = int(keys_values[i, 0])
            sigma = int(keys_values[i, 1])
            center = int(keys_values[i, 2])
            neighbor = int(keys_values[i, 3])
            if sigma != 1 or l < 0 or l > self.max_angular:
                raise ValueError(
                    f"selected key (o3_lambda={l}, o3_sigma={sigma}) is not computed by "
                    f"this calculator (o3_sigma=1, o3_lambda <= {self.max_angular})"
                )
            name = f"{center},{neighbor}"
            b = torch.nonzero(batch_types == neighbor).reshape(-1)
            if name not in samples_by_pair:
                with_neighbor = torch.zeros(len(sizes), dtype=torch.bool)
                if b.numel() > 0:
                    with_neighbor = present[:, int(b[0])]
                keep = (types_host == center) & with_neighbor[system_host] & sample_mask
                rows = torch.nonzero(keep).reshape(-1)
                samples = Labels(
                    ["system", "atom"],
                    torch.stack([system_host[rows], atom_host[rows]], 1).to(torch.int32),
                ).to(device)
                samples_by_pair[name] = (samples, rows.to(device))
            samples, rows = samples_by_pair[name]
            if rows.numel() > 0 and b.numel() > 0:
                values = dense[l][rows, int(b[0])]
            else:
                values = torch.zeros(
                    (rows.shape[0], 2 * l + 1, self.n_radial), dtype=dtype, device=device
                )
            properties = torch.arange(self.n_radial, dtype=torch.int32).reshape(-1, 1)
            if property_index is not None:
                values = values.index_select(2, property_index.to(device))
                properties = property_index.to(torch.int32).reshape(-1, 1)
            blocks.append(
                TensorBlock(
                    values=values,
                    samples=samples,
                    components=[
                        Labels(
                            ["o3_mu"],
                            torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1),
                        ).to(device)
                    ],
                    properties=Labels(["n"], properties).to(device),
                )
            )
        return TensorMap(Labels(key_names, keys_values.to(torch.int32)).to(device), blocks)


def _select(selection: Labels, names: List[str], values: torch.Tensor) -> torch.Tensor:
    """Which rows of ``values`` (columns ``names``) match an entry of ``selection``
    on the selection's columns."""
    columns: List[int] = []
    for name in selection.names:
        if name not in names:
            raise ValueError(
                f"selection has a column '{name}' that is not one of {names}"
            )
        columns.append(names.index(name))
    chosen = selection.values.to(torch.device("cpu"), torch.int64)
    own = values[:, columns]
    return (own[:, None, :] == chosen[None, :, :]).all(dim=2).any(dim=1)


class LodeToIrreps(torch.nn.Module):
    """LODE features of every atom, straight into a flat e3nn tensor.

    ``forward(systems)`` gives ``[n_atoms, irreps_out.dim]`` (atoms in the order of
    the systems, then of their atoms), equal to ``TensorMapToIrreps.from_calculator(
    calculator, atom_types, basis=basis, layout=layout)`` applied to the
    calculator's ``TensorMap``, without building it. Made by
    :py:meth:`LodeSphericalExpansion.to_irreps`.
    """

    def __init__(
        self,
        calculator: LodeSphericalExpansion,
        atom_types: Sequence[int],
        *,
        basis: str = "e3nn",
        layout: str = "mul_ir",
    ):
        super().__init__()
        types = [int(t) for t in atom_types]
        if len(types) == 0 or len(set(types)) != len(types):
            raise ValueError(f"atom_types must be distinct and non-empty, got {types}")
        types = sorted(types)
        self.calculator = calculator
        self.basis = check_option("basis", basis, BASES)
        self.layout = check_option("layout", layout, LAYOUTS)
        self.atom_types: List[int] = types
        L = calculator.max_angular
        mul = len(types) * calculator.n_radial
        #: the e3nn irreps of the output
        self.irreps_out = o3.Irreps([(mul, (l, (-1) ** l)) for l in range(L + 1)])
        self._e3nn_basis = basis == "e3nn"
        self._ir_mul = layout == "ir_mul"

    def extra_repr(self) -> str:
        return f"{self.irreps_out}, basis={self.basis}, layout={self.layout}"

    def forward(self, systems: List[System]) -> torch.Tensor:
        calculator = self.calculator
        cells_host, types_host, sizes = calculator._read_batch(systems)
        known = torch.tensor(self.atom_types, dtype=torch.int64)
        index = torch.searchsorted(known, types_host).clamp(max=known.shape[0] - 1)
        unknown = known[index] != types_host
        if bool(unknown.any()):
            bad = int_list(torch.unique(types_host[unknown]))
            raise ValueError(
                f"atom types {bad} are not among the atom_types {self.atom_types} "
                "of this module"
            )
        device = systems[0].positions.device
        dense = calculator._expansion(
            systems, cells_host, index, known.shape[0], sizes, self._e3nn_basis
        )
        parts: List[torch.Tensor] = []
        for block in dense:
            n_atoms = block.shape[0]
            if self._ir_mul:
                # [atoms, 2l+1, types, n]
                parts.append(block.permute(0, 2, 1, 3).reshape(n_atoms, -1))
            else:
                # [atoms, types, n, 2l+1]
                parts.append(block.permute(0, 1, 3, 2).reshape(n_atoms, -1))
        return torch.cat(parts, dim=1)
