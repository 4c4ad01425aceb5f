"""Helpers shared by the examples: metatomic ``System``s from arrays, ASE atoms or
other systems, rotations of a structure, the rock-salt crystal and the gallery's
structures, a LODE calculator, the per-atom indices of a list of systems, per-system
sums, adapter rows in atom order, vesin edges of a batch, and the equivariance checks
(and their plot) of the gallery examples.

The examples import this file as ``common`` (each puts its own directory first on
``sys.path``, so that they run from anywhere). The functions that models call at run
time (``atom_indices``, ``first_atoms``, ``sum_per_system``, ``rows_to_atoms``,
``batch_edges``) are TorchScript-compatible: a scripted model compiles them into its
own file, so that loading a saved model needs neither this module nor
``rascaline_e3nn`` (vesin-torch's library, for ``batch_edges``, must be loaded).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from metatomic.torch import System
from vesin_torch import NeighborList

NA, CL = 11, 17
#: side of the conventional cubic cell of rock-salt NaCl (Å)
NACL_A = 5.64


# ------------------------------------------------------------------ building systems


def make_system(types, positions, cell=None, pbc=None,
                dtype: torch.dtype = torch.float64) -> System:
    """A ``System`` from array-likes (lists, numpy arrays or tensors): ``types``
    ``[n]``, ``positions`` ``[n, 3]`` (Å), ``cell`` ``[3, 3]`` (rows are the cell
    vectors; None or zeros: not periodic) and ``pbc`` (default: periodic in every
    direction where the cell is given)."""
    positions = torch.as_tensor(positions, dtype=dtype)
    if cell is None:
        cell = torch.zeros((3, 3), dtype=dtype)
    cell = torch.as_tensor(cell, dtype=dtype)
    if pbc is None:
        pbc = bool(cell.abs().sum() > 0)
    if isinstance(pbc, bool):
        pbc = [pbc] * 3
    return System(
        types=torch.as_tensor(types, dtype=torch.int32),
        positions=positions,
        cell=cell,
        pbc=torch.as_tensor(pbc, dtype=torch.bool),
    )


def system_from_ase(atoms, dtype: torch.dtype = torch.float64) -> System:
    """The ``System`` of an ``ase.Atoms`` (types, positions, cell and pbc)."""
    return make_system(atoms.numbers, atoms.positions, atoms.cell.array,
                       [bool(p) for p in atoms.pbc], dtype=dtype)


def replace(system: System, positions: Optional[torch.Tensor] = None,
            cell: Optional[torch.Tensor] = None) -> System:
    """A copy of ``system`` with other ``positions`` and/or ``cell`` (e.g. ones that
    require grad, or a detached cell), keeping the neighbour lists it holds."""
    if positions is None:
        positions = system.positions
    if cell is None:
        cell = system.cell
    copy = System(types=system.types, positions=positions, cell=cell, pbc=system.pbc)
    for request in system.known_neighbor_lists():
        copy.add_neighbor_list(request, system.get_neighbor_list(request))
    return copy


def with_grad_positions(systems: Sequence[System], device=None
                        ) -> Tuple[List[System], List[torch.Tensor]]:
    """Copies of ``systems`` (moved to ``device``) whose positions are fresh leaves
    that require grad, and these positions (for forces by autograd)."""
    out, positions = [], []
    for s in systems:
        p = s.positions.detach().clone().to(device).requires_grad_(True)
        out.append(System(types=s.types.to(device), positions=p, cell=s.cell.to(device),
                          pbc=s.pbc.to(device)))
        positions.append(p)
    return out, positions


def rotate(system: System, R: torch.Tensor) -> System:
    """``system`` with positions and cell transformed by ``R`` (proper or improper);
    a periodic cell stays right-handed (flipping a cell vector leaves the lattice
    unchanged)."""
    R = R.to(system.positions.dtype)
    cell = system.cell @ R.T
    if bool(system.pbc.any()) and torch.det(cell) < 0:
        cell = cell * torch.tensor([[-1.0], [1.0], [1.0]], dtype=cell.dtype)
    return System(types=system.types, positions=system.positions @ R.T, cell=cell,
                  pbc=system.pbc)


def rock_salt(a: float = NACL_A, repeat: int = 1, rattle: float = 0.0,
              seed: int = 0) -> System:
    """NaCl crystal: ``repeat**3`` conventional cubic cells of side ``a`` (Å; 4 Na then
    4 Cl per cell), atoms displaced by Gaussian noise of ``rattle`` Å (seeded)."""
    fractional = torch.tensor(
        [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0],
         [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
    shifts = torch.cartesian_prod(*[torch.arange(repeat, dtype=torch.float64)] * 3)
    positions = ((shifts.reshape(-1, 1, 3) + fractional[None]) * a).reshape(-1, 3)
    if rattle > 0:
        generator = torch.Generator().manual_seed(seed)
        positions += rattle * torch.randn(positions.shape, generator=generator,
                                          dtype=torch.float64)
    types = torch.tensor([NA] * 4 + [CL] * 4).repeat(repeat**3)
    return make_system(types, positions, torch.eye(3, dtype=torch.float64) * a * repeat)


def rock_salt_atoms(a: float = NACL_A, repeat: int = 1, rattle: float = 0.0,
                    seed: int = 0):
    """The same crystal as an ``ase.Atoms`` (ASE's atom order), rattled by ASE."""
    import ase.build

    atoms = ase.build.bulk("NaCl", "rocksalt", a=a, cubic=True).repeat(repeat)
    if rattle > 0:
        atoms.rattle(stdev=rattle, seed=seed)
    return atoms


def structures(repeat: int = 1) -> List[System]:
    """Two small periodic structures of the gallery examples: the water-sodium box
    embedded in ``rascaline_e3nn.check`` (skewed cell, 7 atoms) and rock-salt NaCl
    (``repeat**3`` cubic cells of 8 atoms) rattled by 0.2 Å."""
    from rascaline_e3nn.check import DEFAULT_CELL, DEFAULT_POSITIONS, DEFAULT_TYPES

    return [make_system(DEFAULT_TYPES, DEFAULT_POSITIONS, DEFAULT_CELL),
            rock_salt(repeat=repeat, rattle=0.2, seed=1)]


def lode_calculator(max_angular: int = 2, max_radial: int = 3, smearing: float = 1.0):
    """featomic-torch's ``LodeSphericalExpansion`` of a smeared 1/r potential (Å),
    ``max_radial + 1`` GTO radial functions."""
    import featomic.torch as featomic

    return featomic.LodeSphericalExpansion(
        density={"type": "SmearedPowerLaw", "smearing": smearing, "exponent": 1},
        basis={
            "type": "TensorProduct",
            "max_angular": max_angular,
            "radial": {"type": "Gto", "max_radial": max_radial, "radius": 3.0},
        },
    )


# ------------------------------------------------- per-atom indices, per-system sums


def atom_indices(systems: List[System]) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every atom of ``systems``, in order: the index of its system and its index
    within it (int32, on the systems' device)."""
    device = systems[0].positions.device
    system_index = torch.cat([
        torch.full((len(s),), i, dtype=torch.int32, device=device)
        for i, s in enumerate(systems)
    ])
    atom_index = torch.cat(
        [torch.arange(len(s), dtype=torch.int32, device=device) for s in systems])
    return system_index, atom_index


def first_atoms(systems: List[System]) -> torch.Tensor:
    """Position of each system's first atom in the concatenation of their atoms, and
    the total number of atoms last (``[n_systems + 1]``, int64)."""
    device = systems[0].positions.device
    counts = torch.tensor([len(s) for s in systems], dtype=torch.long, device=device)
    return torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                      torch.cumsum(counts, 0)])


def sum_per_system(values: torch.Tensor, system: torch.Tensor,
                   n_systems: int) -> torch.Tensor:
    """Sums of ``values`` (per atom, ``[n_atoms, ...]``) over the atoms of each system
    (``system``: each atom's system index): ``[n_systems, ...]``."""
    shape = [n_systems] + list(values.shape[1:])
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_add(0, system.to(torch.long), values)


# ---------------------------------------------------------- node features, edges


def rows_to_atoms(x: torch.Tensor, system: torch.Tensor, atom: torch.Tensor,
                  first: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` labelled ``(system, atom)`` (e.g. an adapter's output and its
    samples) as ``[n_atoms, ...]`` in the order of the systems then their atoms
    (``first``: from ``first_atoms``); zeros for atoms without a row."""
    position = first[system.to(torch.long)] + atom.to(torch.long)
    shape = [int(first[-1])] + list(x.shape[1:])
    out = torch.zeros(shape, dtype=x.dtype, device=x.device)
    return out.index_copy(0, position, x)


def batch_edges(systems: List[System], cutoff: float, full_list: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Edges of every system of a batch within ``cutoff`` (Å), from vesin-torch:
    ``edge_index`` ``[2, n_edges]`` (centre, neighbour; atoms numbered over the
    batch, systems then atoms) and ``edge_vectors`` ``[n_edges, 3]`` (neighbour -
    centre, periodic images included), differentiable with respect to positions and
    cell. No self-pairs. TorchScript-compatible."""
    calculator = NeighborList(cutoff=cutoff, full_list=full_list)
    indices: List[torch.Tensor] = []
    vectors: List[torch.Tensor] = []
    offset = 0
    for s in systems:
        pairs, distance_vectors = calculator.compute(
            points=s.positions, box=s.cell, periodic=s.pbc, quantities="PD")
        indices.append(pairs.to(torch.long).T + offset)
        vectors.append(distance_vectors)
        offset += len(s)
    return torch.cat(indices, dim=1), torch.cat(vectors)


# ------------------------------------------------------------------------ rotations


def accurate_rotation(generator: torch.Generator) -> torch.Tensor:
    """A random rotation (float64) for which e3nn's ``D_from_matrix`` is accurate to
    1e-14: e3nn recovers Euler angles from the matrix and loses precision for some
    rotations (up to ~1e-10 for l = 2), which would hide the equivariance errors of
    the model under test behind those of the reference."""
    from e3nn import o3

    # e3nn builds its Wigner matrices in the default dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for _ in range(1000):
            q = torch.randn(4, generator=generator, dtype=torch.float64)
            R = o3.quaternion_to_matrix(q / q.norm())
            if (o3.Irrep(1, -1).D_from_matrix(R) - R).abs().max() < 1e-14:
                return R
    finally:
        torch.set_default_dtype(default)
    raise RuntimeError("no rotation with accurate Wigner matrices in 1000 draws")


def parity_flipped(irreps):
    """``irreps`` with every parity reversed (``1x0e + 1x1o`` -> ``1x0o + 1x1e``): the
    representation of a model that ignored parity."""
    from e3nn import o3

    return o3.Irreps([(mul, (ir.l, -ir.p)) for mul, ir in o3.Irreps(irreps)])


def outputs_and_forces(model, systems: Sequence[System]):
    """``model(systems)`` (per-atom outputs), ``model.energies(systems)`` and the forces
    (autograd), all detached."""
    systems, positions = with_grad_positions(systems)
    per_atom = model(systems)
    energies = model.energies(systems)
    forces = torch.autograd.grad(-energies.sum(), positions)
    return per_atom.detach(), energies.detach(), torch.cat(forces)


def check_rotations(model, systems: Sequence[System], irreps_out, n_rotations: int,
                    seed: int, progress: bool = True):
    """Equivariance of ``model`` (``model(systems)``: per-atom outputs of
    ``irreps_out``, systems then atoms; ``model.energies(systems)``) under
    ``n_rotations`` random rotations R, each applied as R (proper) and -R (improper) to
    positions and cells. Returns the outputs, energies and forces of ``systems`` and
    the largest errors per kind: energies (absolute), forces and per-atom outputs
    (relative to their largest value) against ``irreps_out.D_from_matrix(R)``; for
    improper rotations also the smallest error of a reference that ignores the
    outputs' parity (a control: it must be large)."""
    from e3nn import o3
    from tqdm import tqdm

    irreps_out = o3.Irreps(irreps_out)
    wrong = parity_flipped(irreps_out)
    per_atom, energies, forces = outputs_and_forces(model, systems)
    scale = per_atom.abs().max()
    generator = torch.Generator().manual_seed(seed)
    errors = {k: {"energy": 0.0, "forces": 0.0, "per_atom": 0.0}
              for k in ("proper", "improper")}
    errors["improper"]["per_atom_parity_ignored"] = float("inf")
    trials = [(accurate_rotation(generator), kind) for _ in range(n_rotations)
              for kind in ("proper", "improper")]
    for R, kind in tqdm(trials, desc="rotations", disable=not progress, leave=False):
        if kind == "improper":
            R = -R
        per_atom_r, energies_r, forces_r = outputs_and_forces(
            model, [rotate(s, R) for s in systems])
        e = errors[kind]
        e["energy"] = max(e["energy"], float((energies_r - energies).abs().max()))
        e["forces"] = max(e["forces"], float((forces_r - forces @ R.T).abs().max()
                                             / forces.abs().max()))
        D = irreps_out.D_from_matrix(R).to(per_atom.dtype)
        e["per_atom"] = max(e["per_atom"],
                            float((per_atom_r - per_atom @ D.T).abs().max() / scale))
        if kind == "improper":
            D = wrong.D_from_matrix(R).to(per_atom.dtype)
            e["per_atom_parity_ignored"] = min(
                e["per_atom_parity_ignored"],
                float((per_atom_r - per_atom @ D.T).abs().max() / scale))
    return per_atom, energies, forces, errors


def plot_errors(rows, path: str, title: str) -> None:
    """A bar chart (log scale) of equivariance errors: ``rows`` maps a label to a
    value; labels containing "ignored" (controls, expected large) are drawn apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    values = [max(float(rows[k]), 1e-17) for k in labels]
    colours = ["tab:red" if "ignored" in k else "tab:blue" for k in labels]
    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.4 * len(labels)), dpi=120)
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(1e-17, 1e1)
    ax.axvline(2.2e-16, color="grey", linestyle=":", linewidth=1)
    ax.text(2.2e-16, len(labels) - 0.4, " float64 epsilon", fontsize=7, color="grey")
    ax.set_xlabel("largest error (relative; energies absolute)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def error_rows(errors) -> dict:
    """``check_rotations``' errors as labelled rows for ``plot_errors``."""
    rows = {}
    for kind in ("proper", "improper"):
        for name, value in errors[kind].items():
            if name == "per_atom_parity_ignored":
                continue
            rows[f"{name.replace('_', '-')}, {kind}"] = value
    rows["per-atom, improper, parity ignored (control)"] = \
        errors["improper"]["per_atom_parity_ignored"]
    return rows
