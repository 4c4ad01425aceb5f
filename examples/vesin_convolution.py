"""An e3nn convolution on vesin edges, with LODE node features.

Node features: featomic-torch's ``LodeSphericalExpansion`` of periodic structures (a
water-sodium box with a skewed cell, and rattled rock-salt NaCl), converted by
``TensorMapToIrreps`` to e3nn's ``mul_ir`` layout and basis. Edges: vesin-torch's
``NeighborList(cutoff, full_list=True)`` on the same systems (periodic images
included). Two NequIP-style interaction layers: the message of each edge is an
``o3.FullyConnectedTensorProduct`` of the neighbour's features with the spherical
harmonics of the edge vector, its weights an MLP of the edge length (Bessel basis,
smooth cutoff); messages are summed on the centre atom (``index_add``), a
self-connection added, and a gated non-linearity between the layers. The readout
gives per atom an energy (``0e``), a vector (``1o``) and a symmetric traceless
tensor (``2e``); energies are summed per structure, forces come from autograd through
LODE and vesin.

The weights are random: equivariance is a property of the architecture, not of
training. The script checks it, in float64, under proper and improper rotations of
the structures (positions and cell): the energy is invariant, the forces and the
per-atom outputs transform with e3nn's ``D_from_matrix``, and the TorchScript model
(``torch.jit.script`` of the typed module, vesin's neighbour list included) gives the
eager model's outputs.

Run with ``python examples/vesin_convolution.py`` (a few seconds).
"""

import argparse
import copy
import math
import os
import sys
import time
from typing import List

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from e3nn.util.jit import compile as e3nn_compile
from metatomic.torch import System

from rascaline_e3nn import TensorMapToIrreps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    batch_edges,
    check_rotations,
    error_rows,
    first_atoms,
    lode_calculator,
    parity_flipped,
    plot_errors,
    rows_to_atoms,
    structures,
    sum_per_system,
)

#: the per-atom outputs: an energy, a vector, a symmetric traceless tensor
OUTPUT_IRREPS = o3.Irreps("1x0e + 1x1o + 1x2e")


class RadialMLP(torch.nn.Module):
    """Edge length -> tensor-product weights: ``n_basis`` Bessel functions
    ``sin(n pi r / cutoff) / r`` times a polynomial envelope that goes smoothly to
    zero at the cutoff (NequIP's, p = 6), then an MLP."""

    def __init__(self, cutoff: float, n_out: int, n_basis: int = 8, hidden: int = 16):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("frequencies", math.pi / cutoff * torch.arange(1, n_basis + 1))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(n_basis, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, n_out))

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        r = lengths.unsqueeze(-1)
        bessel = torch.sin(self.frequencies.to(r.dtype) * r) / r
        x = (lengths / self.cutoff).clamp(max=1.0).unsqueeze(-1)
        p = 6.0
        envelope = (1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1)
                    - p * (p + 1) / 2 * x ** (p + 2))
        return self.mlp(bessel * envelope)


class Convolution(torch.nn.Module):
    """One NequIP-style interaction: ``x_i' = Linear(x_i) + 1/avg sum_j
    TP(x_j, Y(r_ij); w(|r_ij|))``, summed over the edges ``(i, j)``."""

    def __init__(self, irreps_in, irreps_sh, irreps_out, cutoff: float,
                 avg_neighbors: float):
        super().__init__()
        self.sh = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
        self.tp = o3.FullyConnectedTensorProduct(
            irreps_in, irreps_sh, irreps_out, shared_weights=False, internal_weights=False)
        self.radial = RadialMLP(cutoff, self.tp.weight_numel)
        self.self_connection = o3.Linear(irreps_in, irreps_out)
        self.avg_neighbors = avg_neighbors

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        centre, neighbour = edge_index[0], edge_index[1]
        messages = self.tp(x[neighbour], self.sh(edge_vectors),
                           self.radial(torch.linalg.norm(edge_vectors, dim=1)))
        out = torch.zeros((x.shape[0], messages.shape[1]), dtype=x.dtype, device=x.device)
        out = out.index_add(0, centre, messages)
        return self.self_connection(x) + out / self.avg_neighbors


class ConvolutionModel(torch.nn.Module):
    """``systems -> per-atom OUTPUT_IRREPS``: LODE -> ``TensorMapToIrreps`` -> linear
    embedding -> convolution -> gate -> convolution -> linear readout, on vesin edges
    within ``cutoff``. ``forward`` returns ``[n_atoms, 9]`` in the order of the
    systems and their atoms; ``energies`` the per-system sums of the ``0e`` column."""

    def __init__(self, atom_types: List[int], cutoff: float = 4.0, mul: int = 8,
                 max_angular: int = 2, max_radial: int = 3, avg_neighbors: float = 10.0):
        super().__init__()
        self.calculator = lode_calculator(max_angular, max_radial)
        self.to_irreps = TensorMapToIrreps.from_calculator(self.calculator, atom_types)
        self.cutoff = cutoff
        hidden = o3.Irreps([(mul, (l, (-1) ** l)) for l in range(max_angular + 1)])
        irreps_sh = o3.Irreps.spherical_harmonics(max_angular)
        self.embed = o3.Linear(self.to_irreps.irreps_out, hidden)
        gated = o3.Irreps([(m, ir) for m, ir in hidden if ir.l > 0])
        self.gate = e3nn_nn.Gate(
            f"{mul}x0e", [torch.nn.functional.silu],
            f"{gated.num_irreps}x0e", [torch.sigmoid], gated)
        self.conv1 = Convolution(hidden, irreps_sh, self.gate.irreps_in, cutoff, avg_neighbors)
        self.conv2 = Convolution(self.gate.irreps_out, irreps_sh, hidden, cutoff, avg_neighbors)
        self.readout = o3.Linear(hidden, OUTPUT_IRREPS)

    def node_features(self, systems: List[System]) -> torch.Tensor:
        """The adapter's output, one row per atom (systems, then atoms)."""
        x, samples = self.to_irreps.forward_with_samples(self.calculator(systems))
        return rows_to_atoms(x, samples.column("system"), samples.column("atom"),
                             first_atoms(systems))

    def forward(self, systems: List[System]) -> torch.Tensor:
        x = self.embed(self.node_features(systems))
        edge_index, edge_vectors = batch_edges(systems, self.cutoff, True)
        h = self.gate(self.conv1(x, edge_index, edge_vectors))
        h = self.conv2(h, edge_index, edge_vectors)
        return self.readout(h)

    @torch.jit.export
    def energies(self, systems: List[System]) -> torch.Tensor:
        system = torch.cat([torch.full((len(s),), i, device=s.positions.device)
                            for i, s in enumerate(systems)])
        return sum_per_system(self.forward(systems)[:, 0], system, len(systems))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cutoff", type=float, default=4.0, help="edge cutoff (Å)")
    parser.add_argument("--mul", type=int, default=8, help="channels per l")
    parser.add_argument("--max-angular", type=int, default=2)
    parser.add_argument("--max-radial", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1,
                        help="cubic cells of the NaCl crystal per axis")
    parser.add_argument("--rotations", type=int, default=3,
                        help="random rotations checked (each proper and improper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="draw the errors into this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    default_dtype = torch.get_default_dtype()
    # e3nn builds its weights and Wigner matrices in the default dtype; featomic
    # computes in float64
    torch.set_default_dtype(torch.float64)
    try:
        return run(args)
    finally:
        torch.set_default_dtype(default_dtype)


def run(args):
    torch.manual_seed(args.seed)
    systems = structures(args.repeat)
    atom_types = sorted({int(t) for s in systems for t in s.types})
    model = ConvolutionModel(atom_types, cutoff=args.cutoff, mul=args.mul,
                             max_angular=args.max_angular, max_radial=args.max_radial)
    edge_index, _ = batch_edges(systems, args.cutoff, True)
    n_atoms = [len(s) for s in systems]
    print(f"{len(systems)} periodic structures ({' + '.join(map(str, n_atoms))} atoms, "
          f"types {atom_types}); {edge_index.shape[1]} vesin edges within {args.cutoff} Å "
          f"({edge_index.shape[1] / sum(n_atoms):.1f} per atom)")
    print(f"node features: LODE -> TensorMapToIrreps -> {model.to_irreps.irreps_out}")
    print(f"convolution: {model.conv1.tp.irreps_in1} x {model.conv1.tp.irreps_in2} -> "
          f"{model.conv1.tp.irreps_out} ({model.conv1.tp.weight_numel} weights per edge "
          f"from the radial MLP); readout {OUTPUT_IRREPS} per atom")

    start = time.perf_counter()
    per_atom, energies, forces, errors = check_rotations(
        model, systems, OUTPUT_IRREPS, args.rotations, args.seed, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"energies (random weights): {', '.join(f'{e:.4f}' for e in energies.tolist())}; "
          f"largest |force| {forces.abs().max():.3e}, |per-atom output| "
          f"{per_atom.abs().max():.3e}")
    for kind, e in errors.items():
        print(f"{kind:>8} rotations: energy error {e['energy']:.1e} (absolute), forces "
              f"{e['forces']:.1e}, per-atom {OUTPUT_IRREPS} {e['per_atom']:.1e} (relative)")
    print(f"  (were the outputs' parity ignored, {parity_flipped(OUTPUT_IRREPS)}, improper "
          f"rotations would show errors of at least "
          f"{errors['improper']['per_atom_parity_ignored']:.2f})")

    scripted = torch.jit.script(e3nn_compile(copy.deepcopy(model)))
    with torch.no_grad():
        eager_out, scripted_out = model(systems), scripted(systems)
        script_error = float((scripted_out - eager_out).abs().max())
        script_energy_error = float((scripted.energies(systems) - energies).abs().max())
    print(f"torch.jit.script(model): per-atom outputs within {script_error:.1e}, energies "
          f"within {script_energy_error:.1e} of the eager model")
    print(f"time: {seconds:.1f} s for {1 + 2 * args.rotations} evaluations with forces")

    if args.plot:
        plot_errors(error_rows(errors), args.plot,
                    "LODE, vesin, e3nn convolution: equivariance (float64)")
        print(f"wrote {args.plot}")

    worst = max(max(v for k, v in e.items() if k != "per_atom_parity_ignored")
                for e in errors.values())
    assert worst < 1e-10, errors
    assert script_error < 1e-12 and script_energy_error < 1e-12
    return {"errors": errors, "script_error": script_error,
            "script_energy_error": script_energy_error,
            "energies": energies.tolist(), "n_edges": int(edge_index.shape[1])}


if __name__ == "__main__":
    main()
