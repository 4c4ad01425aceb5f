"""Learn long-range electrostatics from LODE with e3nn layers, against a SOAP baseline.

Generates periodic boxes of Na+ / Cl- point charges (seeded, charge-neutral, varying
box sizes and compositions, a minimum distance between ions; as in Grisafi &
Ceriotti, J. Chem. Phys. 151, 204105, 2019), computes their Ewald electrostatic energy
(eV) and forces with torch-pme, and trains the same e3nn model (``lode_model.py``) on
two descriptors:

- LODE (exponent 1: a smeared 1/r potential, long range), from
  ``rascaline_e3nn.LodeSphericalExpansion`` straight into an e3nn tensor
  (``calculator.to_irreps``); ``--featomic`` uses featomic-torch's
  ``LodeSphericalExpansion`` and ``TensorMapToIrreps`` instead (the same numbers,
  slower, CPU only);
- featomic's ``SphericalExpansion`` (a Gaussian density within a cutoff, short range:
  the baseline) through ``TensorMapToIrreps``.

The descriptors of every structure are computed once (energy-only training: they do
not change), and the e3nn layers predict per-atom energies from batches of them,
summed per structure. ``--forces`` adds a force term to the loss (descriptors
recomputed with gradients at every step, the force loss differentiated through
them). On held-out structures it reports energy errors of both models and their force
errors (forces by autograd), writes ``metrics.json``, ``learning_curve.png``, the
trained LODE model as one TorchScript file ``model.pt`` (with ``model_config.json``),
and checks in a fresh process (torch, metatensor and metatomic only; featomic too with
``--featomic``) that the saved model gives the same energies, an invariant energy and
equivariant forces under a random rotation.

Run with ``python examples/train_long_range.py`` (a few minutes on 2 CPU cores), or on
several processes with ``torchrun --nproc_per_node 2 examples/train_long_range.py
--distributed`` (DistributedDataParallel; gloo on CPUs, NCCL on GPUs).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional, Set, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from metatomic.torch import System  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import CL, NA, make_system, sum_per_system, with_grad_positions  # noqa: E402
from common import rock_salt as _rock_salt  # noqa: E402
from lode_model import build_model, model_config, save_model  # noqa: E402

CHARGES = {NA: 1.0, CL: -1.0}
#: Madelung constant of rock salt (NaCl), referred to the nearest-neighbour distance
NACL_MADELUNG = 1.747565

# ----------------------------------------------------------------------------- data


def ewald(system: System, smearing: float = 1.0, cutoff: float = 6.0,
          lr_wavelength: float = 0.5) -> torch.Tensor:
    """Ewald electrostatic energy (eV) of the point charges of ``system`` (Na+ = +1,
    Cl- = -1), computed by torch-pme with a vesin neighbour list; differentiable with
    respect to the positions. The defaults converge it to ~1e-9 relative (the
    reciprocal sum includes k up to 2 pi / lr_wavelength, the real-space sum pairs up to
    ``cutoff``, with Gaussian charges of width ``smearing``)."""
    import torchpme
    from vesin_torch import NeighborList

    positions, cell = system.positions, system.cell
    charges = torch.tensor([CHARGES[int(t)] for t in system.types],
                           dtype=positions.dtype, device=positions.device).reshape(-1, 1)
    pairs, distances = NeighborList(cutoff=cutoff, full_list=False).compute(
        points=positions, box=cell, periodic=True, quantities="Pd"
    )
    calculator = torchpme.EwaldCalculator(
        torchpme.CoulombPotential(smearing, prefactor=torchpme.prefactors.eV_A),
        lr_wavelength,
    ).to(dtype=positions.dtype, device=positions.device)
    potentials = calculator(charges, cell, positions, pairs, distances)
    # torch-pme's potentials already include the 1/2 of the pair double counting
    return (charges * potentials).sum()


def ewald_energy_and_forces(system: System) -> Tuple[float, torch.Tensor]:
    (with_grad,), (positions,) = with_grad_positions([system])
    energy = ewald(with_grad)
    (gradient,) = torch.autograd.grad(energy, positions)
    return float(energy.detach()), -gradient


def rock_salt(a: float = 5.64, repeat: int = 1) -> System:
    """Perfect NaCl crystal: ``repeat**3`` conventional cubic cells of side ``a`` (Å)."""
    return _rock_salt(a=a, repeat=repeat)


def random_box(generator: torch.Generator, n_pairs: int, density: float,
               min_distance: float) -> System:
    """``n_pairs`` Na+ and as many Cl- placed uniformly at random in a cubic box of
    ``2 n_pairs / density`` Å^3, no two ions (or periodic images) closer than
    ``min_distance`` Å (random sequential addition)."""
    n = 2 * n_pairs
    side = (n / density) ** (1 / 3)
    positions = torch.zeros((0, 3), dtype=torch.float64)
    while len(positions) < n:
        trial = torch.rand(3, generator=generator, dtype=torch.float64) * side
        delta = positions - trial
        delta -= side * torch.round(delta / side)
        if len(positions) == 0 or delta.norm(dim=1).min() >= min_distance:
            positions = torch.cat([positions, trial[None]])
    return make_system([NA, CL] * n_pairs, positions, torch.eye(3, dtype=torch.float64) * side)


def make_dataset(n_structures: int, seed: int, min_pairs: int = 4, max_pairs: int = 16,
                 min_density: float = 0.015, max_density: float = 0.04,
                 min_distance: float = 2.0, forces_of: Optional[Set[int]] = None,
                 progress: bool = True):
    """Random charge-neutral NaCl boxes and their Ewald energies (eV) and forces
    (eV/Å; only for the structures in ``forces_of``, all if None, else None).
    Densities in ions per Å^3 (crystalline NaCl: 0.045)."""
    generator = torch.Generator().manual_seed(seed)
    systems, energies, forces = [], [], []
    for i in tqdm(range(n_structures), desc="structures + Ewald (torch-pme)",
                  disable=not progress, leave=False):
        n_pairs = int(torch.randint(min_pairs, max_pairs + 1, (1,), generator=generator))
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        system = random_box(generator, n_pairs, min_density + u * (max_density - min_density),
                            min_distance)
        if forces_of is None or i in forces_of:
            energy, force = ewald_energy_and_forces(system)
        else:
            with torch.no_grad():
                energy, force = float(ewald(system)), None
        systems.append(system)
        energies.append(energy)
        forces.append(force)
    return systems, torch.tensor(energies, dtype=torch.float64), forces


# ---------------------------------------------------------------- cached descriptors


class FeatureCache:
    """The descriptors of every structure (the model's ``rows``: e3nn tensors and the
    species index of each atom), computed once and kept as plain tensors, and batches
    of them (rows concatenated, with each row's position in the batch)."""

    def __init__(self, model, systems: List[System], desc: str, progress: bool):
        self.x: List[torch.Tensor] = []
        self.species: List[torch.Tensor] = []
        start = time.perf_counter()
        with torch.no_grad():
            for system in tqdm(systems, desc=desc, disable=not progress, leave=False):
                x, species, _, atom = model.rows([system])
                if not torch.equal(atom, torch.arange(len(system))):
                    raise ValueError(f"{desc}: rows other than the atoms in order")
                self.x.append(x)
                self.species.append(species)
        self.seconds = time.perf_counter() - start

    def batch(self, indices: List[int], device: torch.device
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``, species index and system (0..len(indices)-1) of every row."""
        counts = torch.tensor([len(self.x[i]) for i in indices])
        system = torch.repeat_interleave(torch.arange(len(indices)), counts)
        x = torch.cat([self.x[i] for i in indices])
        species = torch.cat([self.species[i] for i in indices])
        return x.to(device), species.to(device), system.to(device)


class Head(torch.nn.Module):
    """The trainable part of an ``EnergyModel``: energies of a batch from its
    descriptors (pure tensors, so that DistributedDataParallel can wrap it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, species: torch.Tensor, system: torch.Tensor,
                n_systems: int) -> torch.Tensor:
        energies = self.model.energies_from_irreps(x, species)
        return sum_per_system(energies, system, n_systems)


class Timer:
    def __init__(self):
        self.seconds: Dict[str, float] = {"descriptors": 0.0, "batching": 0.0, "e3nn": 0.0}

    def add(self, name: str, start: float, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[name] += now - start
        return now


# ------------------------------------------------------------------------ training


def energies_from_cache(head, batch: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        n_systems: int, device: torch.device, timer: Timer) -> torch.Tensor:
    start = time.perf_counter()
    x, species, system = batch
    energies = head(x, species, system, n_systems)
    timer.add("e3nn", start, device)
    return energies


def energies_and_forces(head, model, systems: List[System], device: torch.device,
                        timer: Timer, create_graph: bool):
    """Energies and forces (autograd) of ``systems``, descriptors recomputed."""
    batch, positions = with_grad_positions(systems, device)
    start = time.perf_counter()
    x, species, system, _ = model.rows(batch)
    start = timer.add("descriptors", start, device)
    energies = head(x, species, system, len(systems))
    gradients = torch.autograd.grad(energies.sum(), positions, create_graph=create_graph)
    timer.add("e3nn", start, device)
    return energies, [-g for g in gradients]


def set_normalisation(model, cache: FeatureCache, indices: List[int],
                      energies: torch.Tensor, n_atoms: torch.Tensor):
    """Whitening of the features, energy scale and shift from the training set, then
    the least-squares fit of the linear path (``lode_model.EnergyModel``)."""
    x, species, system = cache.batch(indices, torch.device("cpu"))
    per_atom = energies[indices] / n_atoms[indices]
    model.set_normalisation(x, float(per_atom.std()), float(per_atom.mean()))
    model.fit_linear_path(x, species, system, energies[indices])


class Distributed:
    """Rank, world size and reductions; a single process when not under torchrun."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.rank, self.world = 0, 1
        if enabled:
            import torch.distributed as dist

            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def sum(self, values: List[float], device: torch.device) -> List[float]:
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()  # rank 0 writes the outputs meanwhile
            dist.destroy_process_group()


def train_one(kind: str, args, systems, energies, forces, train_idx, test_idx,
              device, dist: Distributed, progress: bool):
    """Train one model; returns the model, its history and metrics."""
    torch.manual_seed(args.seed)  # same initial weights on every rank
    hypers = {}
    if kind == "lode" and args.featomic:
        kind = "lode-featomic"
    model = build_model(kind, [NA, CL], hypers=hypers, hidden=args.hidden)
    config = model_config(kind, [NA, CL], hypers=hypers, hidden=args.hidden)
    timer = Timer()
    n_atoms = torch.tensor([len(s) for s in systems], dtype=torch.float64)

    cache = FeatureCache(model, systems, f"{kind.upper()} descriptors", progress)
    timer.seconds["descriptors"] += cache.seconds
    set_normalisation(model, cache, train_idx, energies, n_atoms)
    model = model.to(device)

    head = Head(model)
    if dist.enabled:
        head = torch.nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None,
            # the buffers are equal on every rank; broadcasting them would make every
            # forward (evaluation shards differ in size) a collective
            forward_sync_buffers=False)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    energies_d = energies.to(device)
    n_atoms_d = n_atoms.to(device)
    scale = model.energy_scale.item()

    def fixed_batches(indices: List[int]) -> List[Tuple[List[int], Tuple]]:
        """Evaluation batches, assembled once on the device."""
        chunks = [indices[b:b + args.batch_size]
                  for b in range(0, len(indices), args.batch_size)]
        return [(chunk, cache.batch(chunk, device)) for chunk in chunks]

    def evaluate(batches: List[Tuple[List[int], Tuple]]) -> Tuple[float, float]:
        """Sum of absolute energy errors and count, over this rank's share."""
        total, count = 0.0, 0
        with torch.no_grad():
            for chunk, features in batches:
                pred = energies_from_cache(head, features, len(chunk), device, timer)
                total += float((pred - energies_d[chunk]).abs().sum())
                count += len(chunk)
        return total, count

    # this rank's share of the training set (for the per-epoch error) and of the test set
    train_batches = fixed_batches(train_idx[dist.rank::dist.world])
    test_batches = fixed_batches(test_idx[dist.rank::dist.world])

    history: Dict[str, List[float]] = {"train": [], "test": []}

    def record() -> None:
        """Append the train and test energy MAE, summed over all ranks, to history."""
        train_sum, train_n = evaluate(train_batches)
        test_sum, test_n = evaluate(test_batches)
        train_sum, train_n, test_sum, test_n = dist.sum(
            [train_sum, train_n, test_sum, test_n], device)
        history["train"].append(train_sum / train_n)
        history["test"].append(test_sum / test_n)

    # epoch 0: the least-squares linear path alone (the non-linear path starts at zero)
    record()
    bar = tqdm(range(args.epochs), desc=f"training {kind.upper()} + e3nn",
               disable=not progress, leave=False)
    for epoch in bar:
        # DistributedSampler's split: every rank draws the same permutation
        # (seed + epoch) and takes its share of it
        sampler = torch.utils.data.DistributedSampler(
            train_idx, num_replicas=dist.world, rank=dist.rank, shuffle=True,
            seed=args.seed, drop_last=False)
        sampler.set_epoch(epoch)
        mine = [train_idx[i] for i in sampler]
        for b in range(0, len(mine), args.batch_size):
            chunk = mine[b:b + args.batch_size]
            optimizer.zero_grad()
            if args.forces:
                pred, force_pred = energies_and_forces(
                    head, model, [systems[i] for i in chunk], device, timer, True)
            else:
                start = time.perf_counter()
                features = cache.batch(chunk, device)
                timer.add("batching", start, device)
                pred = energies_from_cache(head, features, len(chunk), device, timer)
            start = time.perf_counter()
            loss = (((pred - energies_d[chunk]) / n_atoms_d[chunk] / scale) ** 2).mean()
            if args.forces:
                target = torch.cat([forces[i] for i in chunk]).to(device)
                loss = loss + args.force_weight * (
                    ((torch.cat(force_pred) - target) / scale) ** 2).mean()
            with warnings.catch_warnings():
                # the weights' gradient of a force loss needs the features' first
                # derivatives only; featomic warns that it drops the second ones
                # (rascaline_e3nn's LODE has them)
                warnings.filterwarnings("ignore", message="second derivatives with respect")
                loss.backward()
            optimizer.step()
            timer.add("e3nn", start, device)
        scheduler.step()
        record()
        bar.set_postfix(train=f"{history['train'][-1]:.3f} eV",
                        test=f"{history['test'][-1]:.3f} eV")

    # final metrics on the held-out set: energies, and forces by autograd
    mine_test = test_idx[dist.rank::dist.world]
    energy_sum, force_sum, force_n = 0.0, 0.0, 0
    for b in range(0, len(mine_test), args.batch_size):
        chunk = mine_test[b:b + args.batch_size]
        pred, force_pred = energies_and_forces(head, model, [systems[i] for i in chunk],
                                               device, timer, False)
        pred = pred.detach()
        energy_sum += float((pred - energies_d[chunk]).abs().sum())
        target = torch.cat([forces[i] for i in chunk]).to(device)
        force_sum += float((torch.cat(force_pred).detach() - target).abs().sum())
        force_n += target.numel()
    spread = spread_of(energies)
    energy_sum, force_sum, force_n = dist.sum([energy_sum, force_sum, float(force_n)], device)
    metrics = {
        "test_energy_mae": energy_sum / len(test_idx),
        "test_energy_relative_mae": energy_sum / len(test_idx) / spread,
        "test_force_mae": force_sum / force_n,
        "seconds": dict(timer.seconds),
    }
    return model, head, config, history, metrics


def spread_of(energies: torch.Tensor) -> float:
    """Mean absolute deviation of the energies of the whole data set (eV): the error of
    predicting their mean; relative errors are MAEs divided by it."""
    return float((energies - energies.mean()).abs().mean())


def identical_across_ranks(model, dist: Distributed, device) -> float:
    """Largest difference between any rank's trainable weights and rank 0's."""
    if not dist.enabled:
        return 0.0
    import torch.distributed as dist_

    flat = torch.cat([p.detach().reshape(-1) for p in model.head.parameters()]).to(device)
    gathered = [torch.zeros_like(flat) for _ in range(dist.world)]
    dist_.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


# ---------------------------------------------------------------- outputs and checks


CHECK_SCRIPT = r"""
import json, sys
import torch
import metatensor.torch, metatomic.torch  # registers the TorchScript classes and operators
if sys.argv[3] == "featomic":
    import featomic.torch
from metatomic.torch import System

model = torch.jit.load(sys.argv[1])
data = torch.load(sys.argv[2])
systems = [System(types=d["types"], positions=d["positions"], cell=d["cell"],
                  pbc=torch.tensor([True, True, True])) for d in data["systems"]]
energies = model(systems).detach()

# a random rotation of the first structure (positions and cell)
R = data["rotation"]
s = systems[0]
positions = s.positions.clone().requires_grad_(True)
rotated_positions = (s.positions @ R.T).clone().requires_grad_(True)
e = model([System(types=s.types, positions=positions, cell=s.cell, pbc=s.pbc)])
e_rot = model([System(types=s.types, positions=rotated_positions, cell=s.cell @ R.T,
                      pbc=s.pbc)])
(f,) = torch.autograd.grad(-e.sum(), positions)
(f_rot,) = torch.autograd.grad(-e_rot.sum(), rotated_positions)
assert "rascaline_e3nn" not in sys.modules and "e3nn" not in sys.modules
assert sys.argv[3] == "featomic" or "featomic" not in sys.modules
json.dump({
    "energies": energies.tolist(),
    "rotation_energy_error": float((e_rot - e).abs().max()),
    "rotation_force_error": float((f_rot - f @ R.T).abs().max()),
    "force_scale": float(f.abs().max()),
}, sys.stdout)
"""


def check_saved_model(path: str, model, systems: List[System], directory: str,
                      featomic: bool = False) -> Dict:
    """Reload ``model.pt`` in a fresh Python process (importing only torch,
    metatensor and metatomic, and featomic if ``featomic``) and compare its energies
    with the trained model's; rotate the first structure and check the energy's
    invariance and the forces' equivariance."""
    from e3nn import o3

    data = {
        "systems": [{"types": s.types, "positions": s.positions, "cell": s.cell}
                    for s in systems],
        "rotation": o3.rand_matrix(dtype=torch.float64),
    }
    data_path = os.path.join(directory, "check_systems.pt")
    torch.save(data, data_path)
    try:
        result = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, path, data_path,
                                 "featomic" if featomic else "-"],
                                capture_output=True, text=True, check=False)
    finally:
        os.remove(data_path)
    if result.returncode != 0:
        raise RuntimeError(f"reloading {path} failed:\n{result.stderr}")
    reloaded = json.loads(result.stdout)
    model = model.cpu()
    with torch.no_grad():
        expected = model(systems)
    reloaded["energy_difference"] = float(
        (torch.tensor(reloaded.pop("energies"), dtype=torch.float64) - expected).abs().max())
    return reloaded


def plot(histories: Dict[str, Dict[str, List[float]]], path: str, n_train: int,
         n_test: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours = {"lode": "tab:blue", "soap": "tab:orange"}
    names = {"lode": "LODE + e3nn", "soap": "SOAP + e3nn (short range)"}
    for kind, history in histories.items():
        epochs = range(len(history["train"]))
        ax.plot(epochs, history["train"], "--", color=colours[kind],
                label=f"{names[kind]}, train ({n_train})")
        ax.plot(epochs, history["test"], "-", color=colours[kind],
                label=f"{names[kind]}, test ({n_test})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (0: least-squares linear path only)")
    ax.set_ylabel("energy MAE (eV per structure)")
    ax.set_title("Ewald energy of random NaCl boxes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="lode_e3nn_run", help="output directory")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-structures", type=int, default=400,
                        help="number of random boxes (train + test)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=16, help="width of the e3nn head")
    parser.add_argument("--forces", action="store_true",
                        help="add a force term to the loss (descriptors recomputed)")
    parser.add_argument("--force-weight", type=float, default=1.0)
    parser.add_argument("--featomic", action="store_true",
                        help="featomic-torch's LodeSphericalExpansion instead of "
                        "rascaline_e3nn's (same values; for comparison)")
    parser.add_argument("--distributed", action="store_true",
                        help="DistributedDataParallel under torchrun")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the reload / rotation check of model.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads (the e3nn layers work on small batches, "
                        "where more threads mostly wait; rascaline_e3nn's LODE runs on these too, "
                        "featomic has its own pool)")
    return parser.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> Dict:
    start_time = time.perf_counter()
    # e3nn builds its Wigner matrices in the default dtype; the descriptors are float64
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist = Distributed(args.distributed, device)
    progress = not args.quiet and dist.rank == 0
    os.makedirs(args.output, exist_ok=True)

    n_test = max(1, round(args.test_fraction * args.n_structures))
    order = torch.randperm(args.n_structures,
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
    # every rank generates the same data set from the seed; reference forces where
    # they are used (test set, and training set with --forces)
    systems, energies, forces = make_dataset(
        args.n_structures, args.seed, forces_of=None if args.forces else set(test_idx),
        progress=progress)

    results, histories = {}, {}
    for kind in ("lode", "soap"):
        results[kind] = train_one(kind, args, systems, energies, forces, train_idx, test_idx,
                                  device, dist, progress)
        histories[kind] = results[kind][3]

    lode_model, _, lode_config, _, lode = results["lode"]
    soap = results["soap"][4]
    max_rank_difference = identical_across_ranks(lode_model, dist, device)
    metrics = {
        "lode_test_energy_mae": lode["test_energy_mae"],
        "soap_test_energy_mae": soap["test_energy_mae"],
        "lode_test_energy_relative_mae": lode["test_energy_relative_mae"],
        "soap_test_energy_relative_mae": soap["test_energy_relative_mae"],
        "lode_over_soap_energy_mae": lode["test_energy_mae"] / soap["test_energy_mae"],
        "lode_test_force_mae": lode["test_force_mae"],
        "soap_test_force_mae": soap["test_force_mae"],
        "n_structures": args.n_structures,
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "n_atoms": int(sum(len(s) for s in systems)),
        "energy_min": float(energies.min()),
        "energy_max": float(energies.max()),
        "energy_mean_absolute_deviation": spread_of(energies),
        "lode_implementation": "featomic" if args.featomic else "rascaline_e3nn",
        "seconds_lode_descriptors": lode["seconds"]["descriptors"],
        "seconds_soap_descriptors": soap["seconds"]["descriptors"],
        "seconds_batching": lode["seconds"]["batching"] + soap["seconds"]["batching"],
        "seconds_e3nn": lode["seconds"]["e3nn"] + soap["seconds"]["e3nn"],
        "seconds_by_model": {"lode": lode["seconds"], "soap": soap["seconds"]},
        "epochs": args.epochs,
        "forces_in_loss": args.forces,
        "world_size": dist.world,
        "max_weight_difference_across_ranks": max_rank_difference,
        "history": histories,
    }

    if dist.rank == 0:
        save_model(lode_model.cpu(), lode_config, args.output)
        plot(histories, os.path.join(args.output, "learning_curve.png"), len(train_idx),
             len(test_idx))
        if not args.no_check:
            check = check_saved_model(os.path.join(args.output, "model.pt"), lode_model,
                                      [systems[i] for i in test_idx[:4]], args.output,
                                      featomic=args.featomic)
            metrics["reloaded_model"] = check
            assert check["energy_difference"] < 1e-10, check
            assert check["rotation_energy_error"] < 1e-8, check
            assert check["rotation_force_error"] < 1e-8 * max(1.0, check["force_scale"]), check
        metrics["seconds_total"] = time.perf_counter() - start_time
        with open(os.path.join(args.output, "metrics.json"), "w") as fd:
            json.dump(metrics, fd, indent=2)
        summary(metrics, args.output)
    dist.close()
    return metrics


def summary(m: Dict, output: str):
    print(f"\n{m['n_structures']} random NaCl boxes ({m['n_atoms']} ions), "
          f"{m['n_train']} for training, {m['n_test']} held out; {m['epochs']} epochs"
          + (", energies and forces" if m["forces_in_loss"] else ", energies only")
          + (f", {m['world_size']} processes" if m["world_size"] > 1 else ""))
    print(f"energies from {m['energy_min']:.1f} to {m['energy_max']:.1f} eV, mean absolute "
          f"deviation {m['energy_mean_absolute_deviation']:.2f} eV (relative errors: MAE / "
          "this)")
    print(f"  LODE + e3nn: energy MAE {m['lode_test_energy_mae']:.4f} eV/structure "
          f"({100 * m['lode_test_energy_relative_mae']:.2f} %), force MAE "
          f"{m['lode_test_force_mae']:.4f} eV/Å")
    print(f"  SOAP + e3nn: energy MAE {m['soap_test_energy_mae']:.4f} eV/structure "
          f"({100 * m['soap_test_energy_relative_mae']:.2f} %), force MAE "
          f"{m['soap_test_force_mae']:.4f} eV/Å")
    print(f"  LODE / SOAP energy error: {m['lode_over_soap_energy_mae']:.3f}")
    lode_name = ("featomic's LODE" if m["lode_implementation"] == "featomic"
                 else "LODE (rascaline_e3nn)")
    print(f"time: {lode_name} {m['seconds_lode_descriptors']:.1f} s, SOAP (featomic) "
          f"{m['seconds_soap_descriptors']:.1f} s, batching the cached descriptors "
          f"{m['seconds_batching']:.1f} s, e3nn layers {m['seconds_e3nn']:.1f} s (with "
          + ("the backward pass of the force loss and " if m["forces_in_loss"] else "")
          + f"the optimiser), total {m['seconds_total']:.0f} s")
    if "reloaded_model" in m:
        r = m["reloaded_model"]
        print(f"model.pt reloaded in a fresh process: energies within "
              f"{r['energy_difference']:.1e} eV; under a random rotation the energy "
              f"changes by {r['rotation_energy_error']:.1e} eV, the forces by "
              f"{r['rotation_force_error']:.1e} eV/Å")
    print(f"wrote {output}/metrics.json, learning_curve.png, model.pt, model_config.json")


if __name__ == "__main__":
    main()
