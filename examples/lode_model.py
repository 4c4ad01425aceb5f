"""An e3nn energy model on LODE (long range) or SOAP (short range) descriptors.

``build_model("lode", [11, 17])`` gives an untrained model of the main example's
architecture (``examples/train_long_range.py``):

    descriptors -> [n_atoms, irreps] -> e3nn head -> per-atom energy -> summed per system

The descriptors, by ``kind``:

- ``"lode"``: ``rascaline_e3nn.LodeSphericalExpansion`` (PyTorch; featomic's LODE
  computed with torch operations, on the systems' device, differentiable with respect
  to positions and cell) straight into an e3nn tensor through its ``to_irreps``, no
  ``TensorMap`` in between;
- ``"lode-featomic"``: featomic-torch's ``LodeSphericalExpansion`` (CPU only, no cell
  gradients) -> ``TensorMapToIrreps``: the same numbers (to ~1e-14), for comparison;
- ``"soap"``: featomic-torch's ``SphericalExpansion`` -> ``TensorMapToIrreps``.

The e3nn head has two paths, added:

- a per-species ``o3.Linear`` on the scalar (``0e``) channels: the electrostatic energy
  of point charges is close to linear in the l = 0 LODE features of each species, and
  this path represents that part exactly;
- a gated block (``e3nn.nn.Gate``) on all channels up to the calculator's ``max_angular``,
  then a ``FullyConnectedTensorProduct`` of its output with itself into scalars, and a
  small MLP: the non-linear part, mixing l > 0 channels into invariants.

``EnergyModel`` is scriptable (``script_model``) and keeps the descriptors and the e3nn
layers together, so that a saved model needs neither this package nor this file:
``torch.jit.load("model.pt")(systems)`` returns the energies of a list of
``metatomic.torch.System`` (float64), in eV. A ``"lode"`` model loads with torch,
metatensor-torch and metatomic-torch alone; the two others also need featomic-torch
imported (its TorchScript classes).
"""

import copy
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from e3nn.util.jit import compile as e3nn_compile
from metatomic.torch import System

from rascaline_e3nn import LodeSphericalExpansion, TensorMapToIrreps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import atom_indices, first_atoms, sum_per_system  # noqa: E402

#: the kinds of descriptors ``build_model`` knows
KINDS = ("lode", "lode-featomic", "soap")

#: default hyper-parameters of the two calculators (featomic's, in Å)
LODE_DEFAULTS = {
    "smearing": 1.0,
    "max_angular": 2,
    "max_radial": 3,
    "radius": 3.0,
}
SOAP_DEFAULTS = {
    "cutoff": 4.5,
    "width": 0.5,
    "max_angular": 2,
    "max_radial": 3,
}


def make_calculator(kind: str, hypers: Dict) -> torch.nn.Module:
    """The calculator of ``kind`` (see ``KINDS``) with ``hypers`` (missing entries take
    ``LODE_DEFAULTS`` / ``SOAP_DEFAULTS``): ``rascaline_e3nn.LodeSphericalExpansion``
    for ``"lode"``, featomic-torch's calculators for the two others. The two LODE
    calculators take the same arguments and give the same values."""
    if kind in ("lode", "lode-featomic"):
        h = {**LODE_DEFAULTS, **hypers}
        arguments = dict(
            density={"type": "SmearedPowerLaw", "smearing": h["smearing"], "exponent": 1},
            basis={
                "type": "TensorProduct",
                "max_angular": h["max_angular"],
                "radial": {"type": "Gto", "max_radial": h["max_radial"], "radius": h["radius"]},
            },
        )
        if kind == "lode":
            return LodeSphericalExpansion(**arguments)
        import featomic.torch as featomic

        return featomic.LodeSphericalExpansion(**arguments)
    if kind == "soap":
        import featomic.torch as featomic

        h = {**SOAP_DEFAULTS, **hypers}
        return featomic.SphericalExpansion(
            cutoff={
                "radius": h["cutoff"],
                "smoothing": {"type": "ShiftedCosine", "width": 0.5},
            },
            density={"type": "Gaussian", "width": h["width"]},
            basis={
                "type": "TensorProduct",
                "max_angular": h["max_angular"],
                "radial": {"type": "Gto", "max_radial": h["max_radial"]},
            },
        )
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class DirectFeatures(torch.nn.Module):
    """Descriptors of every atom as an e3nn tensor, from
    ``LodeSphericalExpansion.to_irreps`` (no ``TensorMap``): ``forward(systems)`` gives
    ``(x [n_atoms, irreps_out.dim], system, atom)``, atoms in the order of the systems
    then of their atoms."""

    def __init__(self, calculator: LodeSphericalExpansion, atom_types: List[int]):
        super().__init__()
        self.calculator = calculator
        self.to_irreps = calculator.to_irreps(atom_types)
        self.irreps_out = self.to_irreps.irreps_out

    def forward(self, systems: List[System]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        system, atom = atom_indices(systems)
        return self.to_irreps(systems), system, atom


class TensorMapFeatures(torch.nn.Module):
    """Descriptors as an e3nn tensor from a featomic calculator's ``TensorMap`` through
    ``TensorMapToIrreps``: ``forward(systems)`` gives ``(x, system, atom)``, one row per
    sample of the ``TensorMap`` (every atom, for LODE and SOAP)."""

    def __init__(self, calculator: torch.nn.Module, atom_types: List[int]):
        super().__init__()
        self.calculator = calculator
        self.to_irreps = TensorMapToIrreps.from_calculator(calculator, atom_types=atom_types)
        self.irreps_out = self.to_irreps.irreps_out

    def forward(self, systems: List[System]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, samples = self.to_irreps.forward_with_samples(self.calculator(systems))
        return x, samples.column("system"), samples.column("atom")


class E3nnHead(torch.nn.Module):
    """Per-atom energies from an irreps tensor ``[n_atoms, irreps_in.dim]`` and each
    atom's species index ``[n_atoms]``: a per-species linear map of the scalars plus a
    gated block, a tensor product into scalars and an MLP (see the module docstring)."""

    def __init__(self, irreps_in: o3.Irreps, n_species: int, hidden: int = 16, mul: int = 4):
        super().__init__()
        irreps_in = o3.Irreps(irreps_in)
        self.n_species = n_species
        # linear path: only the 0e channels reach 0e outputs; one output per species,
        # with a bias (the per-species reference energy)
        self.linear = o3.Linear(irreps_in, o3.Irreps(f"{n_species}x0e"), biases=True)

        gated = o3.Irreps([(mul, ir) for _, ir in irreps_in if ir.l > 0]).simplify()
        scalars = o3.Irreps(f"{hidden}x0e")
        gates = o3.Irreps(f"{gated.num_irreps}x0e")
        self.gate = e3nn_nn.Gate(
            scalars, [torch.nn.functional.silu], gates, [torch.sigmoid], gated
        )
        self.pre = o3.Linear(irreps_in, self.gate.irreps_in)
        # mixes every l of the gated block with itself into invariants
        self.tp = o3.FullyConnectedTensorProduct(
            self.gate.irreps_out, self.gate.irreps_out, o3.Irreps(f"{hidden}x0e")
        )
        self.mlp = torch.nn.Sequential(
            torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, n_species),
        )
        # the non-linear path starts at zero: an untrained head is the linear path alone
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)
        if irreps_in[0].ir != o3.Irrep("0e"):
            raise ValueError(f"the input irreps must start with scalars, got {irreps_in}")
        self.n_scalars = irreps_in[0].mul

    @torch.jit.unused
    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the linear path to ``y[species] = x[:, :n_scalars] @ weight[:, species] +
        bias[species]`` (``weight``: ``[n_scalars, n_species]``), undoing e3nn's
        ``1 / sqrt(fan_in)`` normalisation."""
        with torch.no_grad():
            self.linear.weight.copy_((weight * self.n_scalars**0.5).reshape(-1))
            self.linear.bias.copy_(bias)

    def forward(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        g = self.gate(self.pre(x))
        y = self.linear(x) + self.mlp(self.tp(g, g))
        return y.gather(1, species.reshape(-1, 1)).reshape(-1)


class EnergyModel(torch.nn.Module):
    """Energies (eV) of a list of systems: descriptors (``DirectFeatures`` or
    ``TensorMapFeatures``) -> ``E3nnHead`` -> per-atom energies, summed per system.

    The features are whitened by ``feature_transform`` (within each irrep ``mul x ir``,
    a ``mul x mul`` matrix acting on the channels, the same for every m: equivariant),
    and the head's output multiplied by ``energy_scale`` and shifted by
    ``energy_shift``; all three are buffers, set from training data with
    ``set_normalisation`` (identity, 1 and 0 until then). Whitening matters: the radial
    channels of a smooth potential are strongly correlated, and gradient descent on
    raw features fits the linear part far less precisely than least squares does.
    """

    def __init__(self, features: torch.nn.Module, head: torch.nn.Module,
                 atom_types: List[int]):
        super().__init__()
        self.features = features
        self.head = head
        self.atom_types = [int(t) for t in atom_types]
        index = torch.full((max(self.atom_types) + 1,), -1, dtype=torch.long)
        for i, t in enumerate(self.atom_types):
            index[t] = i
        self.register_buffer("species_index", index)
        dim = features.irreps_out.dim
        self.register_buffer("feature_transform", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("energy_shift", torch.zeros((), dtype=torch.float64))

    @torch.jit.unused
    def set_normalisation(self, x: torch.Tensor, energy_scale: float,
                          energy_shift: float = 0.0) -> None:
        """Whiten the channels of each irrep of ``x`` (``[n_atoms, dim]``, training
        data: second moments over atoms and m, regularised by ``1e-8`` of their trace),
        scale the head's output by ``energy_scale`` and shift it by ``energy_shift``
        (eV per atom)."""
        irreps = self.features.irreps_out
        transform = torch.zeros((irreps.dim, irreps.dim), dtype=torch.float64)
        for sl, (mul, ir) in zip(irreps.slices(), irreps):
            seg = x[:, sl].detach().to(torch.float64).reshape(-1, mul, ir.dim)
            moments = torch.einsum("nim,njm->ij", seg, seg) / (seg.shape[0] * ir.dim)
            moments += 1e-8 * moments.trace() / mul * torch.eye(mul, dtype=torch.float64)
            values, vectors = torch.linalg.eigh(moments)
            whiten = vectors @ torch.diag(values.clamp_min(1e-300).rsqrt()) @ vectors.T
            # mul_ir layout: channel i, component m at i * (2l + 1) + m
            eye = torch.eye(ir.dim, dtype=torch.float64)
            transform[sl, sl] = torch.kron(whiten, eye).T
        self.feature_transform.copy_(transform)
        self.energy_scale.fill_(float(energy_scale))
        self.energy_shift.fill_(float(energy_shift))

    @torch.jit.unused
    def fit_linear_path(self, x: torch.Tensor, species: torch.Tensor, system: torch.Tensor,
                        energies: torch.Tensor) -> None:
        """Least-squares fit of the head's linear path (scalars of each species, with a
        per-species bias) to the energies ``[n_systems]`` of training structures, from
        the descriptors ``x`` and the species index and system index of its rows;
        call after ``set_normalisation``. The e3nn layers then train from there."""
        n_systems, n_species = len(energies), len(self.atom_types)
        n_scalars = self.head.n_scalars
        x0 = (x.detach().to(torch.float64) @ self.feature_transform)[:, :n_scalars]
        design = torch.zeros((n_systems, n_species, n_scalars + 1), dtype=torch.float64)
        ones = torch.ones((len(x0), 1), dtype=torch.float64)
        design.index_put_((system, species), torch.cat([x0, ones], dim=1), accumulate=True)
        counts = torch.zeros(n_systems, dtype=torch.float64).index_add_(
            0, system, ones.reshape(-1))
        target = (energies.to(torch.float64) - counts * self.energy_shift) / self.energy_scale
        solution = torch.linalg.lstsq(design.reshape(n_systems, -1), target[:, None],
                                      rcond=1e-10, driver="gelsd").solution
        solution = solution.reshape(n_species, n_scalars + 1)
        self.head.set_linear(solution[:, :n_scalars].T.contiguous(), solution[:, -1])

    def rows(self, systems: List[System]
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The descriptors ``x`` of ``systems`` (``[rows, irreps_out.dim]``) and the
        species index (position in ``atom_types``), system and atom of each row."""
        x, system, atom = self.features(systems)
        system, atom = system.to(torch.long), atom.to(torch.long)
        types = torch.cat([s.types for s in systems]).to(torch.long)
        species = self.species_index[types[first_atoms(systems)[system] + atom]]
        return x, species, system, atom

    def energies_from_irreps(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Per-row energies from the descriptors ``x`` and the species index
        (position in ``atom_types``) of each row."""
        x = x @ self.feature_transform.to(x.dtype)
        energies = self.head(x, species)
        return energies * self.energy_scale.to(x.dtype) + self.energy_shift.to(x.dtype)

    @torch.jit.export
    def atomic_energies(self, systems: List[System]) -> torch.Tensor:
        """Per-atom energies ``[total atoms]``, in the order of the systems and, within
        each, of their atoms."""
        x, species, system, atom = self.rows(systems)
        energies = self.energies_from_irreps(x, species)
        first = first_atoms(systems)
        return sum_per_system(energies, first[system] + atom, int(first[-1]))

    def forward(self, systems: List[System]) -> torch.Tensor:
        x, species, system, _ = self.rows(systems)
        energies = self.energies_from_irreps(x, species)
        return sum_per_system(energies, system, len(systems))


def build_model(kind: str, atom_types: List[int], hypers: Optional[Dict] = None,
                hidden: int = 16, mul: int = 4) -> EnergyModel:
    """An untrained ``EnergyModel`` of ``kind`` (``KINDS``: "lode", "lode-featomic" or
    "soap") for ``atom_types``, in float64 (featomic computes in float64; ours in the
    systems' dtype). ``hypers`` override the calculator's defaults (``LODE_DEFAULTS`` /
    ``SOAP_DEFAULTS``); ``hidden`` and ``mul`` size the e3nn head. The two LODE kinds
    have the same parameters: the weights of one load into the other."""
    atom_types = sorted(int(t) for t in atom_types)
    calculator = make_calculator(kind, hypers or {})
    if kind == "lode":
        features = DirectFeatures(calculator, atom_types)
    else:
        features = TensorMapFeatures(calculator, atom_types)
    head = E3nnHead(features.irreps_out, len(atom_types), hidden=hidden, mul=mul)
    return EnergyModel(features, head, atom_types).to(torch.float64)


def model_config(kind: str, atom_types: List[int], hypers: Optional[Dict] = None,
                 hidden: int = 16, mul: int = 4) -> Dict:
    """The arguments of ``build_model`` as a JSON-able dict (``model_config.json``)."""
    defaults = SOAP_DEFAULTS if kind == "soap" else LODE_DEFAULTS
    return {
        "kind": kind,
        "atom_types": sorted(int(t) for t in atom_types),
        "hypers": {**defaults, **(hypers or {})},
        "hidden": hidden,
        "mul": mul,
    }


def script_model(model: EnergyModel) -> torch.jit.ScriptModule:
    """A TorchScript copy of ``model`` (the e3nn layers compiled by e3nn's own
    ``compile``, then the container scripted); ``model`` itself is unchanged."""
    copied = copy.deepcopy(model)
    return torch.jit.script(e3nn_compile(copied))


def save_model(model: EnergyModel, config: Dict, directory) -> None:
    """Write ``directory/model.pt`` (scripted) and ``directory/model_config.json``."""
    script_model(model).save(os.path.join(directory, "model.pt"))
    with open(os.path.join(directory, "model_config.json"), "w") as fd:
        json.dump(config, fd, indent=2)
