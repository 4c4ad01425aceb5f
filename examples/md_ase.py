"""NVE molecular dynamics of a periodic Na/Cl crystal in ASE with an exported model.

Loads a metatomic model file (from ``examples/export_metatomic.py``) with
``metatomic_ase.MetatomicCalculator``, runs velocity-Verlet MD of a rock-salt NaCl
supercell (atoms slightly displaced, velocities drawn at the given temperature), and
prints the drift of the total energy per atom and the wall time per step, and the
stress the calculator computed with the forces (NaN for a LODE model, which cannot
differentiate the cell: see the model's warning).

Run with ``python examples/md_ase.py lode-e3nn.pt``.
"""

import argparse
import os
import sys
import time

import numpy as np
from ase import units
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from metatomic_ase import MetatomicCalculator
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import rock_salt_atoms  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="exported metatomic model")
    parser.add_argument(
        "--extensions",
        default="extensions",
        help="TorchScript extensions collected by export_metatomic.py (if present)",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument(
        "--repeat", type=int, default=1, help="repetitions of the 8-atom cubic cell per axis"
    )
    parser.add_argument("--rattle", type=float, default=0.05, help="Å")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    atoms = rock_salt_atoms(repeat=args.repeat, rattle=args.rattle, seed=args.seed)
    extensions = args.extensions if os.path.isdir(args.extensions) else None
    atoms.calc = MetatomicCalculator(args.path, extensions_directory=extensions)
    # Maxwell-Boltzmann momenta, no net momentum
    rng = np.random.default_rng(args.seed)
    masses = atoms.get_masses()[:, None]
    momenta = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * args.temperature)
    atoms.set_momenta(momenta)
    Stationary(atoms)
    n_atoms = len(atoms)
    print(
        f"{atoms.get_chemical_formula()}: {n_atoms} atoms, periodic cell "
        f"{atoms.cell.lengths().round(3).tolist()} Å; {args.steps} NVE steps of "
        f"{args.timestep} fs from {args.temperature} K"
    )

    start = time.perf_counter()
    atoms.get_potential_energy()
    first_call = time.perf_counter() - start
    stress = atoms.calc.results.get("stress")

    totals, potentials = [], []
    dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    with tqdm(total=args.steps, unit="step", desc="NVE") as bar:

        def record():  # called before the first step too
            potentials.append(atoms.get_potential_energy())
            totals.append(potentials[-1] + atoms.get_kinetic_energy())
            if dynamics.nsteps > 0:
                bar.update(1)

        dynamics.attach(record, interval=1)
        start = time.perf_counter()
        dynamics.run(args.steps)
        elapsed = time.perf_counter() - start

    totals = np.array(totals)
    deviation = (totals - totals[0]) / n_atoms
    slope = np.polyfit(np.arange(len(totals)) * args.timestep / 1000, deviation, 1)[0]
    print(f"first evaluation (loading, warm-up): {first_call:.2f} s")
    print(f"time per step: {1000 * elapsed / args.steps:.1f} ms ({n_atoms} atoms)")
    print(
        f"total energy per atom: drift {deviation[-1]:+.2e} eV after "
        f"{args.steps * args.timestep:g} fs (linear fit {slope:+.2e} eV/ps), "
        f"largest deviation {np.abs(deviation).max():.2e} eV; the potential energy per "
        f"atom spans {np.ptp(potentials) / n_atoms:.2e} eV"
    )
    print(f"final temperature: {atoms.get_temperature():.0f} K")
    if stress is not None:
        stress = np.array2string(stress, precision=3)
        print(f"stress from the calculator (Voigt, eV/Å^3): {stress}")


if __name__ == "__main__":
    main()
