"""An e3nn energy model on featomic descriptors: LODE (long range) or SOAP (short range).

``build_model("lode", [11, 17])`` gives an untrained model of the main example's
architecture (``examples/train_long_range.py``):

    featomic calculator -> TensorMapToIrreps -> e3nn head -> per-atom energy
                                                            -> summed per system

The e3nn head has two paths, added:

- a per-species ``o3.Linear`` on the scalar (``0e``) channels: the electrostatic energy
  of point charges is close to linear in the l = 0 LODE features of each species, and
  this path represents that part exactly;
- a gated block (``e3nn.nn.Gate``) on all channels up to the calculator's ``max_angular``,
  then a ``FullyConnectedTensorProduct`` of its output with itself into scalars, and a
  small MLP: the non-linear part, mixing l > 0 channels into invariants.

``EnergyModel`` is scriptable (``script_model``) and keeps the calculator, the adapter and
the e3nn layers together, so that a saved model needs neither this package nor this file:
``torch.jit.load("model.pt")(systems)`` returns the energies of a list of
``metatomic.torch.System`` (float64), in eV.
"""

import copy
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import featomic.torch as featomic
import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from e3nn.util.jit import compile as e3nn_compile
from metatensor.torch import TensorMap
from metatomic.torch import System

from rascaline_e3nn import TensorMapToIrreps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import first_atoms, sum_per_system  # noqa: E402

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
    """The featomic-torch calculator of ``kind`` ("lode" or "soap") with ``hypers``
    (missing entries take ``LODE_DEFAULTS`` / ``SOAP_DEFAULTS``)."""
    if kind == "lode":
        h = {**LODE_DEFAULTS, **hypers}
        return featomic.LodeSphericalExpansion(
            density={"type": "SmearedPowerLaw", "smearing": h["smearing"], "exponent": 1},
            basis={
                "type": "TensorProduct",
                "max_angular": h["max_angular"],
                "radial": {"type": "Gto", "max_radial": h["max_radial"], "radius": h["radius"]},
            },
        )
    if kind == "soap":
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
    raise ValueError(f"kind must be 'lode' or 'soap', got {kind!r}")


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
    """Energies (eV) of a list of systems: featomic calculator -> ``TensorMapToIrreps``
    -> ``E3nnHead`` -> per-atom energies, summed per system.

    The features are whitened by ``feature_transform`` (within each irrep ``mul x ir``,
    a ``mul x mul`` matrix acting on the channels, the same for every m: equivariant),
    and the head's output multiplied by ``energy_scale`` and shifted by
    ``energy_shift``; all three are buffers, set from training data with
    ``set_normalisation`` (identity, 1 and 0 until then). Whitening matters: the radial
    channels of a smooth potential are strongly correlated, and gradient descent on
    raw features fits the linear part far less precisely than least squares does.
    """

    def __init__(self, calculator: torch.nn.Module, to_irreps: TensorMapToIrreps,
                 head: torch.nn.Module, atom_types: List[int]):
        super().__init__()
        self.calculator = calculator
        self.to_irreps = to_irreps
        self.head = head
        self.atom_types = [int(t) for t in atom_types]
        index = torch.full((max(self.atom_types) + 1,), -1, dtype=torch.long)
        for i, t in enumerate(self.atom_types):
            index[t] = i
        self.register_buffer("species_index", index)
        dim = to_irreps.irreps_out.dim
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
        irreps = self.to_irreps.irreps_out
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
        the adapter's output ``x`` and the species index and system index of its rows;
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

    def row_energies(self, features: TensorMap) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row energies of a featomic ``TensorMap`` (computed beforehand) and the
        ``system`` and ``atom`` column of each row."""
        x, samples = self.to_irreps.forward_with_samples(features)
        species = self.species_index[samples.column("center_type").to(torch.long)]
        energies = self.energies_from_irreps(x, species)
        return energies, samples.column("system"), samples.column("atom")

    def energies_from_irreps(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Per-row energies from the adapter's output ``x`` and the species index
        (position in ``atom_types``) of each row."""
        x = x @ self.feature_transform.to(x.dtype)
        energies = self.head(x, species)
        return energies * self.energy_scale.to(x.dtype) + self.energy_shift.to(x.dtype)

    def energies_from_features(self, features: TensorMap, n_systems: int,
                               system_map: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``[n_systems]`` from features computed beforehand; ``system_map``
        maps the features' ``system`` values to 0..n_systems-1 (identity if None)."""
        energies, system, _ = self.row_energies(features)
        system = system.to(torch.long)
        if system_map is not None:
            system = system_map[system]
        return sum_per_system(energies, system, n_systems)

    @torch.jit.export
    def atomic_energies(self, systems: List[System]) -> torch.Tensor:
        """Per-atom energies ``[total atoms]``, in the order of the systems and, within
        each, of their atoms."""
        energies, system, atom = self.row_energies(self.calculator(systems))
        first = first_atoms(systems)
        position = first[system.to(torch.long)] + atom.to(torch.long)
        return sum_per_system(energies, position, int(first[-1]))

    def forward(self, systems: List[System]) -> torch.Tensor:
        energies, system, _ = self.row_energies(self.calculator(systems))
        return sum_per_system(energies, system, len(systems))


def build_model(kind: str, atom_types: List[int], hypers: Optional[Dict] = None,
                hidden: int = 16, mul: int = 4) -> EnergyModel:
    """An untrained ``EnergyModel`` of ``kind`` ("lode" or "soap") for ``atom_types``,
    in float64 (featomic computes in float64). ``hypers`` override the calculator's
    defaults (``LODE_DEFAULTS`` / ``SOAP_DEFAULTS``); ``hidden`` and ``mul`` size the
    e3nn head."""
    atom_types = sorted(int(t) for t in atom_types)
    calculator = make_calculator(kind, hypers or {})
    to_irreps = TensorMapToIrreps.from_calculator(calculator, atom_types=atom_types)
    head = E3nnHead(to_irreps.irreps_out, len(atom_types), hidden=hidden, mul=mul)
    return EnergyModel(calculator, to_irreps, head, atom_types).to(torch.float64)


def model_config(kind: str, atom_types: List[int], hypers: Optional[Dict] = None,
                 hidden: int = 16, mul: int = 4) -> Dict:
    """The arguments of ``build_model`` as a JSON-able dict (``model_config.json``)."""
    defaults = LODE_DEFAULTS if kind == "lode" else SOAP_DEFAULTS
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
