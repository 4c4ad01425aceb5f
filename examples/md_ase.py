"""Molecular dynamics of a periodic Na/Cl crystal in ASE with an exported model: NVE,
and NPT with ASE's Berendsen barostat.

Loads a metatomic model file (from ``examples/export_metatomic.py``) with
``metatomic_ase.MetatomicCalculator`` and runs a rock-salt NaCl supercell (atoms
slightly displaced, velocities drawn at the given temperature):

- ``--ensemble nve``: velocity Verlet; prints the drift of the total energy per atom;
- ``--ensemble npt``: ``ase.md.nptberendsen.NPTBerendsen`` (isotropic Berendsen
  barostat and thermostat), which rescales the cell from the pressure of the stress the
  calculator returns; the model's stress is exact (autograd through the cell, the
  LODE's reciprocal-space sum included);
- ``--ensemble both`` (default): NVE, then NPT from the same start.

Both print volume, pressure, temperature and energies over time, and the wall time per
step (the calculator computes energy, forces and stress at every evaluation; NVE
evaluates once per step, ASE's NPTBerendsen twice, since it rescales the cell before
each velocity-Verlet step, which invalidates the forces of the previous one).

The model of ``examples/train_long_range.py`` learns the Ewald energy of point charges:
there is no short-range repulsion, and a crystal of point charges has no equilibrium
(its pressure is about -10 GPa at NaCl's lattice constant, and ions of opposite charge
fall onto each other). ``--repulsion`` (default on) adds a Born-Mayer repulsion between
Na and Cl, ``A exp(-r / rho)`` with rho = 0.321 Å and A set so that the point-charge
crystal plus repulsion is in equilibrium at a = 5.64 Å (``BornMayer``, an ASE
calculator summed with the model's by ``ase.calculators.mixing.SumCalculator``);
``--no-repulsion`` runs the model alone.

Run with ``python examples/md_ase.py lode-e3nn.pt`` (``--ensemble nve|npt|both``).
"""

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.mixing import SumCalculator
from ase.md.nptberendsen import NPTBerendsen
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from metatomic_ase import MetatomicCalculator
from vesin import NeighborList

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import NACL_A, rock_salt_atoms  # noqa: E402

#: e^2 / (4 pi epsilon_0) in eV Å
COULOMB = 14.399645
#: Madelung constant of rock salt, referred to the nearest-neighbour distance
MADELUNG = 1.747565


class BornMayer(Calculator):
    """Born-Mayer repulsion between atoms of different types, ``A exp(-r / rho)`` for
    each pair closer than ``cutoff`` (energy shifted to zero there; periodic in every
    direction, pairs from vesin's neighbour list): energy, forces and stress. ``for_rock_salt(rho, a)`` sets ``A`` so that point charges +-1 plus this
    repulsion between nearest neighbours are in equilibrium at lattice constant ``a``."""

    implemented_properties = ["energy", "energies", "forces", "stress"]

    def __init__(self, A: float, rho: float, cutoff: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.A, self.rho, self.cutoff = A, rho, cutoff

    @classmethod
    def for_rock_salt(cls, rho: float = 0.321, a: float = NACL_A, **kwargs) -> "BornMayer":
        r0 = a / 2
        # d/dr [-M k / r + 6 A exp(-r / rho)] = 0 at r0 (per ion pair)
        A = MADELUNG * COULOMB / r0**2 * rho / 6 * math.exp(r0 / rho)
        return cls(A, rho, **kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        i, j, r, D = NeighborList(cutoff=self.cutoff, full_list=True).compute(
            points=self.atoms.positions, box=self.atoms.cell.array, periodic=True,
            quantities="ijdD")
        numbers = self.atoms.numbers
        unlike = numbers[i] != numbers[j]
        i, j, r, D = i[unlike], j[unlike], r[unlike], D[unlike]
        shift = self.A * math.exp(-self.cutoff / self.rho)
        pair = self.A * np.exp(-r / self.rho) - shift
        derivative = -self.A / self.rho * np.exp(-r / self.rho)  # dU/dr
        n = len(self.atoms)
        # every pair appears twice (i, j) and (j, i)
        energies = 0.5 * np.bincount(i, weights=pair, minlength=n)
        pair_forces = (derivative / r)[:, None] * D  # dU/dD, D = r_j - r_i
        forces = np.zeros((n, 3))
        for axis in range(3):
            forces[:, axis] = np.bincount(i, weights=pair_forces[:, axis], minlength=n)
        virial = 0.5 * (pair_forces[:, :, None] * D[:, None, :]).sum(axis=0)
        stress = virial / self.atoms.get_volume()
        self.results = {
            "energy": float(energies.sum()),
            "energies": energies,
            "forces": forces,
            "stress": stress.reshape(9)[[0, 4, 8, 5, 2, 1]],
        }


def pressure_gpa(atoms) -> float:
    """Pressure (GPa) of the stress with the ideal-gas (kinetic) term."""
    return float(-np.trace(atoms.get_stress(voigt=False, include_ideal_gas=True)) / 3
                 / units.GPa)


def setup(args, calculator):
    atoms = rock_salt_atoms(repeat=args.repeat, rattle=args.rattle, seed=args.seed)
    atoms.calc = calculator
    # Maxwell-Boltzmann momenta, no net momentum
    rng = np.random.default_rng(args.seed)
    masses = atoms.get_masses()[:, None]
    momenta = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * args.temperature)
    atoms.set_momenta(momenta)
    Stationary(atoms)
    return atoms


def simulate(args, ensemble: str, calculator) -> Dict[str, List[float]]:
    """``args.steps`` steps of ``ensemble`` ("nve" or "npt"); prints a table every
    ``args.print_every`` steps; returns the time series and the time per step."""
    atoms = setup(args, calculator)
    n_atoms = len(atoms)
    # TorchScript profiles the first calls and optimises the model after them: a few
    # evaluations before the timed steps
    start = time.perf_counter()
    for k in range(3):
        probe = atoms.copy()
        probe.positions[0, 0] += 1e-3 * (k + 1)
        probe.calc = atoms.calc
        probe.get_forces()
    atoms.get_forces()
    first_call = time.perf_counter() - start
    if ensemble == "nve":
        dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    else:
        dynamics = NPTBerendsen(
            atoms,
            timestep=args.timestep * units.fs,
            temperature_K=args.temperature,
            pressure_au=args.pressure * units.GPa,
            taut=args.taut * units.fs,
            taup=args.taup * units.fs,
            compressibility_au=args.compressibility / units.GPa,
        )
    series: Dict[str, List[float]] = {"time_fs": [], "volume": [], "pressure_gpa": [],
                                      "temperature": [], "potential": [], "total": [],
                                      "cell": []}
    print(f"\n{ensemble.upper()}: {atoms.get_chemical_formula()}, {n_atoms} atoms, "
          f"{args.steps} steps of {args.timestep:g} fs from {args.temperature:g} K"
          + (f", {args.pressure:g} GPa (taut {args.taut:g} fs, taup {args.taup:g} fs, "
             f"compressibility {args.compressibility:g} / GPa)" if ensemble == "npt" else ""))
    print(f"{'t (fs)':>8} {'V (Å^3)':>10} {'P (GPa)':>9} {'T (K)':>8} "
          f"{'E_pot/atom':>11} {'E_tot/atom':>11} (eV)")

    def record():  # called before the first step too
        potential = atoms.get_potential_energy()
        total = potential + atoms.get_kinetic_energy()
        series["time_fs"].append(dynamics.nsteps * args.timestep)
        series["volume"].append(atoms.get_volume())
        series["pressure_gpa"].append(pressure_gpa(atoms))
        series["temperature"].append(atoms.get_temperature())
        series["potential"].append(potential / n_atoms)
        series["total"].append(total / n_atoms)
        series["cell"].append(atoms.cell.array.copy())
        if dynamics.nsteps % args.print_every == 0 or dynamics.nsteps == args.steps:
            print(f"{series['time_fs'][-1]:8.1f} {series['volume'][-1]:10.3f} "
                  f"{series['pressure_gpa'][-1]:9.3f} {series['temperature'][-1]:8.1f} "
                  f"{series['potential'][-1]:11.5f} {series['total'][-1]:11.5f}")

    dynamics.attach(record, interval=1)
    start = time.perf_counter()
    dynamics.run(args.steps)
    elapsed = time.perf_counter() - start
    # record() evaluates nothing new: the calculator caches the step's results
    series["ms_per_step"] = 1000 * elapsed / max(args.steps, 1)
    series["first_call_s"] = first_call
    print(f"first 4 evaluations (TorchScript warm-up): {first_call:.2f} s; time per step: "
          f"{series['ms_per_step']:.1f} ms ({n_atoms} atoms, energy, forces and stress)")
    if ensemble == "nve":
        totals = np.array(series["total"])
        deviation = totals - totals[0]
        slope = np.polyfit(np.array(series["time_fs"]) / 1000, deviation, 1)[0]
        print(f"total energy per atom: drift {deviation[-1]:+.2e} eV after "
              f"{args.steps * args.timestep:g} fs (linear fit {slope:+.2e} eV/ps), largest "
              f"deviation {np.abs(deviation).max():.2e} eV; the potential energy per atom "
              f"spans {np.ptp(series['potential']):.2e} eV")
    else:
        volumes = np.array(series["volume"])
        half = len(volumes) // 2
        print(f"volume: {volumes[0]:.3f} -> {volumes[-1]:.3f} Å^3 "
              f"({100 * (volumes[-1] / volumes[0] - 1):+.2f} %); second half: mean "
              f"{volumes[half:].mean():.3f} Å^3, pressure "
              f"{np.mean(series['pressure_gpa'][half:]):+.3f} GPa, temperature "
              f"{np.mean(series['temperature'][half:]):.0f} K")
    return series


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="exported metatomic model")
    parser.add_argument(
        "--extensions",
        default="extensions",
        help="TorchScript extensions collected by export_metatomic.py (if present)",
    )
    parser.add_argument("--ensemble", choices=["nve", "npt", "both"], default="both")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--pressure", type=float, default=0.0, help="GPa (NPT)")
    parser.add_argument("--taut", type=float, default=100.0,
                        help="thermostat time constant, fs (NPT)")
    parser.add_argument("--taup", type=float, default=500.0,
                        help="barostat time constant, fs (NPT)")
    parser.add_argument("--compressibility", type=float, default=1 / 24.0,
                        help="1/GPa, for the barostat's step (NaCl: ~1/24)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="repetitions of the 8-atom cubic cell per axis"
    )
    parser.add_argument("--rattle", type=float, default=0.05, help="Å")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repulsion", action=argparse.BooleanOptionalAction, default=True,
                        help="add a Born-Mayer Na-Cl repulsion to the model")
    parser.add_argument("--print-every", type=int, default=10, help="steps between rows")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads (small systems: more threads mostly wait, "
                        "and collapse when other processes share the cores)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> Dict[str, Dict]:
    extensions = args.extensions if os.path.isdir(args.extensions) else None

    def calculator():
        model = MetatomicCalculator(args.path, extensions_directory=extensions)
        if not args.repulsion:
            return model
        return SumCalculator([model, BornMayer.for_rock_salt()])

    if args.repulsion:
        repulsion = BornMayer.for_rock_salt()
        print(f"model + Born-Mayer Na-Cl repulsion A exp(-r / rho), A = {repulsion.A:.1f} eV, "
              f"rho = {repulsion.rho} Å")
    else:
        print("model alone (no short-range repulsion)")
    ensembles = ["nve", "npt"] if args.ensemble == "both" else [args.ensemble]
    return {ensemble: simulate(args, ensemble, calculator()) for ensemble in ensembles}


if __name__ == "__main__":
    main()
