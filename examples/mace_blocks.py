"""MACE's interaction and product blocks on LODE node features and vesin edges.

MACE builds its first node features from a one-hot embedding of the species; here
they come from featomic's ``LodeSphericalExpansion`` through ``TensorMapToIrreps``
(e3nn's ``mul_ir`` layout and basis, which is MACE's), mixed by a linear layer into
MACE's hidden irreps. Edges come from vesin-torch (``full_list=True``, periodic
images included): vesin's pair ``(i, j)`` with vector ``r_j - r_i`` is MACE's
``(sender, receiver)`` with ``positions[receiver] - positions[sender]``. Two MACE
layers from ``mace.modules.blocks``, as in MACE itself:

- ``RealAgnosticInteractionBlock`` then ``EquivariantProductBasisBlock`` (body order
  ``--correlation`` + 1, no residual),
- ``RealAgnosticResidualInteractionBlock`` then ``EquivariantProductBasisBlock`` with
  the residual (self-connection),

with MACE's ``RadialEmbeddingBlock`` (Bessel basis, polynomial cutoff) on the edge
lengths and e3nn spherical harmonics of the edge vectors. A linear readout gives per
atom an energy (``0e``) and a vector (``1o``); energies are summed per structure and
forces come from autograd through MACE, LODE and vesin.

The weights are random: the script checks, in float64, that the energy is invariant
and the forces and per-atom outputs equivariant under random proper and improper
rotations of the structures (positions and cell).

mace-torch pins e3nn 0.4.4 (this package supports it). e3nn 0.4.4 reads its constants
with ``torch.load``, which torch >= 2.6 refuses by default: the script allows the
``slice`` objects they contain (``torch.serialization.add_safe_globals``) before e3nn
is imported, and restores the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` that importing
``mace`` sets for the whole process. Install with ``pip install -e ".[examples,mace]"`` (in an
environment of its own: mace-torch downgrades e3nn to 0.4.4), then run ``python examples/mace_blocks.py``
(a few seconds).
"""

import argparse
import os
import sys
import time
import warnings
from typing import List

import e3nn
import torch

if tuple(int(v) for v in e3nn.__version__.split(".")[:2]) < (0, 5):
    # e3nn 0.4 reads its constants (``slice`` objects among them) with torch.load,
    # whose weights-only default (torch >= 2.6) refuses them; this must run before
    # anything imports e3nn.o3
    torch.serialization.add_safe_globals([slice])

# importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for the whole process (every
# later torch.load would then load arbitrary pickles, with a warning): undone below
_NO_WEIGHTS_ONLY = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
try:
    # e3nn.o3 first: it reads e3nn's constants, with slice allowed
    from e3nn import o3
    import mace.modules
    from mace.modules.blocks import (
        EquivariantProductBasisBlock,
        RadialEmbeddingBlock,
        RealAgnosticInteractionBlock,
        RealAgnosticResidualInteractionBlock,
    )
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SystemExit(
        f"this example needs mace-torch ({error}): pip install -e '.[examples,mace]', which pins "
        "e3nn 0.4.4 (use an environment of its own)") from error
finally:
    if _NO_WEIGHTS_ONLY is None:
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    else:
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = _NO_WEIGHTS_ONLY

from metatomic.torch import System  # noqa: E402

from rascaline_e3nn import TensorMapToIrreps  # noqa: E402

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

OUTPUT_IRREPS = o3.Irreps("1x0e + 1x1o")


class LodeMace(torch.nn.Module):
    """``systems -> per-atom OUTPUT_IRREPS``: LODE -> ``TensorMapToIrreps`` -> linear
    -> two MACE layers (interaction + product) -> linear readout."""

    def __init__(self, atom_types: List[int], cutoff: float = 4.0, channels: int = 8,
                 max_ell: int = 2, correlation: int = 3, max_angular: int = 2,
                 max_radial: int = 3, avg_num_neighbors: float = 10.0,
                 num_bessel: int = 8):
        super().__init__()
        self.calculator = lode_calculator(max_angular, max_radial)
        self.to_irreps = TensorMapToIrreps.from_calculator(self.calculator, atom_types)
        self.cutoff = cutoff
        index = torch.full((max(atom_types) + 1,), -1, dtype=torch.long)
        index[torch.tensor(atom_types)] = torch.arange(len(atom_types))
        self.register_buffer("species_index", index)
        self.n_species = len(atom_types)

        node_attrs_irreps = o3.Irreps(f"{self.n_species}x0e")  # one-hot species
        hidden = o3.Irreps(f"{channels}x0e + {channels}x1o")
        sh_irreps = o3.Irreps.spherical_harmonics(max_ell)
        # the interactions' output: every l of the harmonics, `channels` times
        interaction_irreps = (sh_irreps * channels).sort()[0].simplify()
        edge_feats_irreps = o3.Irreps(f"{num_bessel}x0e")

        self.embed = o3.Linear(self.to_irreps.irreps_out, hidden)
        self.spherical_harmonics = o3.SphericalHarmonics(
            sh_irreps, normalize=True, normalization="component")
        self.radial = RadialEmbeddingBlock(r_max=cutoff, num_bessel=num_bessel,
                                           num_polynomial_cutoff=5)
        common = dict(node_attrs_irreps=node_attrs_irreps, node_feats_irreps=hidden,
                      edge_attrs_irreps=sh_irreps, edge_feats_irreps=edge_feats_irreps,
                      target_irreps=interaction_irreps, hidden_irreps=hidden,
                      avg_num_neighbors=avg_num_neighbors, radial_MLP=[16, 16])
        self.interactions = torch.nn.ModuleList([
            RealAgnosticInteractionBlock(**common),
            RealAgnosticResidualInteractionBlock(**common),
        ])
        self.products = torch.nn.ModuleList([
            EquivariantProductBasisBlock(
                node_feats_irreps=interaction_irreps, target_irreps=hidden,
                correlation=correlation, num_elements=self.n_species, use_sc=use_sc)
            for use_sc in (False, True)
        ])
        self.readout = o3.Linear(hidden, OUTPUT_IRREPS)

    def forward(self, systems: List[System]) -> torch.Tensor:
        features = self.calculator(systems)
        x, samples = self.to_irreps.forward_with_samples(features)
        node_feats = self.embed(rows_to_atoms(
            x, samples.column("system"), samples.column("atom"), first_atoms(systems)))
        types = torch.cat([s.types for s in systems]).to(torch.long)
        node_attrs = torch.nn.functional.one_hot(
            self.species_index[types], self.n_species).to(node_feats.dtype)

        edge_index, vectors = batch_edges(systems, self.cutoff, True)
        lengths = torch.linalg.norm(vectors, dim=1, keepdim=True)
        edge_attrs = self.spherical_harmonics(vectors)
        edge_feats, _ = self.radial(lengths, node_attrs, edge_index, types)

        for interaction, product in zip(self.interactions, self.products):
            messages, sc = interaction(node_attrs=node_attrs, node_feats=node_feats,
                                       edge_attrs=edge_attrs, edge_feats=edge_feats,
                                       edge_index=edge_index)
            node_feats = product(node_feats=messages, sc=sc, node_attrs=node_attrs)
        return self.readout(node_feats)

    def energies(self, systems: List[System]) -> torch.Tensor:
        system = torch.cat([torch.full((len(s),), i) for i, s in enumerate(systems)])
        return sum_per_system(self.forward(systems)[:, 0], system, len(systems))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cutoff", type=float, default=4.0, help="edge cutoff (Å)")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--max-ell", type=int, default=2,
                        help="largest l of the edges' spherical harmonics")
    parser.add_argument("--correlation", type=int, default=3,
                        help="body order of the product basis, minus one")
    parser.add_argument("--max-angular", type=int, default=2, help="LODE's largest l")
    parser.add_argument("--max-radial", type=int, default=3)
    parser.add_argument("--rotations", type=int, default=3,
                        help="random rotations checked (each proper and improper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="draw the errors into this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    default_dtype = torch.get_default_dtype()
    # MACE and e3nn build their weights and Wigner matrices in the default dtype;
    # featomic computes in float64
    torch.set_default_dtype(torch.float64)
    try:
        return run(args)
    finally:
        torch.set_default_dtype(default_dtype)


def run(args):
    torch.manual_seed(args.seed)
    systems = structures()
    atom_types = sorted({int(t) for s in systems for t in s.types})
    with warnings.catch_warnings():
        # e3nn 0.4 scripts the code it generates for every layer it builds, and recent
        # torch warns about one of its annotations (harmless; e3nn 0.6 does not)
        warnings.filterwarnings("ignore", "The TorchScript type system doesn't support "
                                "instance-level annotations", UserWarning)
        model = LodeMace(atom_types, cutoff=args.cutoff, channels=args.channels,
                         max_ell=args.max_ell, correlation=args.correlation,
                         max_angular=args.max_angular, max_radial=args.max_radial)
    edge_index, _ = batch_edges(systems, args.cutoff, True)
    n_atoms = [len(s) for s in systems]
    version = getattr(mace, "__version__", None) or _version("mace-torch")
    print(f"mace-torch {version}, e3nn {e3nn.__version__}, torch {torch.__version__}")
    print(f"{len(systems)} periodic structures ({' + '.join(map(str, n_atoms))} atoms, "
          f"types {atom_types}); {edge_index.shape[1]} vesin edges within {args.cutoff} Å")
    print(f"node features: LODE -> TensorMapToIrreps -> {model.to_irreps.irreps_out} -> "
          f"{model.embed.irreps_out}")
    for i, (interaction, product) in enumerate(zip(model.interactions, model.products)):
        print(f"layer {i + 1}: {type(interaction).__name__} -> "
              f"{interaction.target_irreps}; {type(product).__name__} (correlation "
              f"{args.correlation}) -> {product.linear.irreps_out}")
    print(f"readout: {OUTPUT_IRREPS} per atom; "
          f"{sum(p.numel() for p in model.parameters())} parameters")

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
    print(f"time: {seconds:.1f} s for {1 + 2 * args.rotations} evaluations with forces")

    if args.plot:
        plot_errors(error_rows(errors), args.plot,
                    "LODE, vesin, MACE blocks: equivariance (float64)")
        print(f"wrote {args.plot}")

    worst = max(max(v for k, v in e.items() if k != "per_atom_parity_ignored")
                for e in errors.values())
    assert worst < 1e-10, errors
    return {"errors": errors, "energies": energies.tolist(),
            "n_edges": int(edge_index.shape[1]), "e3nn": e3nn.__version__}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
