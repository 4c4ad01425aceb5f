"""Export the LODE -> e3nn energy model as a metatomic ``AtomisticModel``.

The exported file is meant for the engines that go through metatomic (ASE's
``metatomic_ase.MetatomicCalculator``, LAMMPS, i-PI, ...; ASE's is the one tested here),
with the TorchScript extensions it needs copied to ``--extensions``. Inside:
``rascaline_e3nn.LodeSphericalExpansion`` straight into an e3nn tensor
(``calculator.to_irreps``) -> e3nn layers -> an ``energy`` ``TensorMap`` in eV, per
system or per atom (``sample_kind="atom"``), restricted to ``selected_atoms`` when the
engine asks. A second, per-atom output, ``rascaline-e3nn::irreps``, gives the e3nn input
of each atom back as a metatensor ``TensorMap`` through ``IrrepsToTensorMap`` (keys
``o3_lambda, o3_sigma``, components ``o3_mu`` in featomic's basis).

Forces and stress are exact: the engine differentiates the energy with respect to the
positions and the cell, and the LODE calculator is differentiable with respect to both
(its reciprocal-space sum included). The model computes in float64 on the CPU or a CUDA
device (``supported_devices``), wherever the engine puts it; the file needs
torch, metatensor-torch and metatomic-torch only, not featomic nor this package.

A model trained with featomic's LODE (``train_long_range.py --featomic``) has the same
parameters: it is exported with ``rascaline_e3nn.LodeSphericalExpansion`` in place of
featomic's calculator (the two agree to ~1e-14; the script checks the energies).
``--featomic`` refuses to export featomic's calculator itself: featomic's LODE gives
no gradients with respect to the cell, and metatomic engines differentiate the cell
for the stress whenever they compute forces of a periodic system (ASE's calculator
does), so such a model could report neither an exact stress nor, in ASE, forces.
(A model on featomic's ``SphericalExpansion``, ``build_model("soap", ...)``, exports
as it is, on the CPU: featomic differentiates its cell.)

Run with ``python examples/export_metatomic.py`` (the model trained by
``examples/train_long_range.py`` in ``lode_e3nn_run/``) or
``python examples/export_metatomic.py --untrained`` (a freshly initialised model of the
same architecture, for a quick test of the engines).
"""

import argparse
import copy
import json
import math
import os
import sys
from typing import Dict, List, Optional

import torch
from e3nn.util.jit import compile as e3nn_compile
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    System,
)

import rascaline_e3nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import atom_indices, rock_salt, sum_per_system  # noqa: E402
from lode_model import build_model  # noqa: E402

#: why featomic's LODE calculator is not exported
FEATOMIC_LODE_MESSAGE = (
    "featomic's LodeSphericalExpansion gives no gradients with respect to the cell: "
    "metatomic engines differentiate the cell for the stress (ASE's calculator whenever "
    "it computes forces of a periodic system), so the exported model could report "
    "neither an exact stress nor, in ASE, forces. Export the same model on "
    "rascaline_e3nn.LodeSphericalExpansion (the default: same parameters, same values)."
)


#: name of the per-atom spherical output (metatomic's "<domain>::<name>")
SPHERICAL_OUTPUT = "rascaline-e3nn::irreps"


class MetatomicEnergy(torch.nn.Module):
    """An energy model (``lode_model.EnergyModel``: ``atomic_energies(systems) ->
    [total atoms]`` in eV, ``rows(systems)`` its descriptors) with the metatomic model
    interface: ``forward(systems, outputs, selected_atoms)``.

    Outputs: ``energy`` (per system or per atom) and ``SPHERICAL_OUTPUT``, the e3nn
    input of the model per atom back in metatensor's conventions through
    ``IrrepsToTensorMap``: keys ``o3_lambda, o3_sigma``, components ``o3_mu`` in
    featomic's basis, one property per channel. The systems reach the model as the
    engine gives them: gradients with respect to positions and cell (forces, stress)
    come from autograd.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.to_tensor_map = rascaline_e3nn.IrrepsToTensorMap(
            model.features.irreps_out, property_name="channel"
        )
        self.spherical_output = SPHERICAL_OUTPUT

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        results: Dict[str, TensorMap] = {}
        if len(systems) == 0:
            return results
        for name, output in outputs.items():
            if len(output.explicit_gradients) != 0:
                raise ValueError(f"this model computes no explicit gradients of {name}")

        if "energy" in outputs:
            energies = self.model.atomic_energies(systems)
            results["energy"] = self._energy(
                systems, energies, outputs["energy"], selected_atoms
            )
        if self.spherical_output in outputs:
            x, _, system, atom = self.model.rows(systems)
            samples = Labels(
                ["system", "atom"], torch.stack([system, atom], 1).to(torch.int32)
            )
            if selected_atoms is not None:
                keep = samples.select(selected_atoms)
                x = x[keep]
                samples = Labels(["system", "atom"], samples.values[keep])
            results[self.spherical_output] = self.to_tensor_map(x, samples)
        return results

    def _energy(
        self,
        systems: List[System],
        energies: torch.Tensor,
        output: ModelOutput,
        selected_atoms: Optional[Labels],
    ) -> TensorMap:
        device = energies.device
        system_index, atom_index = atom_indices(systems)
        samples = Labels(["system", "atom"], torch.stack([system_index, atom_index], 1))

        if selected_atoms is not None:
            keep = samples.select(selected_atoms)
            energies = energies[keep]
            samples = Labels(["system", "atom"], samples.values[keep])

        properties = Labels(["energy"], torch.zeros((1, 1), dtype=torch.int32, device=device))
        if output.sample_kind == "atom":
            block = TensorBlock(
                values=energies.reshape(-1, 1),
                samples=samples,
                components=[],
                properties=properties,
            )
        else:
            totals = sum_per_system(energies, samples.values[:, 0], len(systems))
            block = TensorBlock(
                values=totals.reshape(-1, 1),
                samples=Labels(
                    ["system"],
                    torch.arange(len(systems), dtype=torch.int32, device=device).reshape(-1, 1),
                ),
                components=[],
                properties=properties,
            )
        keys = Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device))
        return TensorMap(keys, [block])


def calculator_of(model: torch.nn.Module) -> torch.nn.Module:
    """The descriptor calculator of an ``EnergyModel``."""
    return model.features.calculator


def has_lode(model: torch.nn.Module) -> bool:
    """Whether ``model`` computes LODE descriptors (ours or featomic's)."""
    return "Lode" in type(calculator_of(model)).__name__


def has_featomic_lode(model: torch.nn.Module) -> bool:
    return has_lode(model) and not isinstance(
        calculator_of(model), rascaline_e3nn.LodeSphericalExpansion
    )


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors; floating ones to 1e-12."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.allclose(a, b, rtol=0, atol=1e-12))
    return bool(torch.equal(a, b))


def load_trained(run: str, keep_featomic: bool = False):
    """Rebuild the model of ``run/model_config.json`` in Python and load the weights of
    ``run/model.pt`` into it; returns the model, the scripted one and the config.

    Unless ``keep_featomic``, a model trained on featomic's LODE (kind
    ``"lode-featomic"``) is rebuilt on ``rascaline_e3nn.LodeSphericalExpansion`` (kind
    ``"lode"``: the same hyper-parameters and weights; only the descriptors' own
    tables differ)."""
    with open(os.path.join(run, "model_config.json")) as file:
        config = json.load(file)
    trained_kind = config["kind"]
    if trained_kind != "lode":
        import featomic.torch  # noqa: F401  (model.pt holds featomic's TorchScript classes)
    if trained_kind == "lode-featomic" and not keep_featomic:
        config = {**config, "kind": "lode"}
    scripted = torch.jit.load(os.path.join(run, "model.pt"))
    model = build_model(**config)
    state = scripted.state_dict()
    if config["kind"] != trained_kind:
        # the descriptors' tables are those of featomic's pipeline; the head and the
        # normalisation are shared
        state = {k: v for k, v in state.items() if not k.startswith("features.")}
        state.update({k: v for k, v in model.state_dict().items()
                      if k.startswith("features.")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a scripted module lists its non-persistent buffers (the adapters' index tables
    # and change-of-basis matrices, planned from the hyper-parameters) in its
    # state_dict: they must equal ours (the matrices, fitted numerically, to rounding)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name in unexpected:
        if name not in buffers or not same(buffers[name], state[name]):
            raise ValueError(f"{run}/model.pt does not match model_config.json: {name}")
    if len(missing) != 0:
        raise ValueError(f"{run}/model.pt lacks {missing}")
    return model, scripted, config


def nacl(repeat: int = 1, rattle: float = 0.1, seed: int = 0) -> System:
    """Rock-salt NaCl (a = 5.64 Å, cubic cell of 8 atoms, repeated), atoms displaced."""
    return rock_salt(repeat=repeat, rattle=rattle, seed=seed)


def export(
    model: torch.nn.Module,
    atom_types: List[int],
    output: str,
    description: str,
    extensions: Optional[str] = None,
):
    """Wrap ``model`` (an energy model on float64 systems, in eV and Å) as a metatomic
    ``AtomisticModel`` and save it to ``output``, with the TorchScript extensions it
    needs (featomic-torch and its libraries for a SOAP model; engines provide
    metatensor's and metatomic's) copied to ``extensions`` when given; returns the
    ``AtomisticModel``. A model on featomic's LODE is refused
    (``FEATOMIC_LODE_MESSAGE``)."""
    model = model.eval()
    if has_featomic_lode(model):
        raise ValueError(FEATOMIC_LODE_MESSAGE)
    lode = has_lode(model)
    if lode:
        architecture = (
            "LODE: A. Grisafi and M. Ceriotti, Incorporating long-range physics in "
            "atomic-scale machine learning, J. Chem. Phys. 151, 204105 (2019)"
        )
    else:
        architecture = (
            "SOAP: A. P. Bartók, R. Kondor and G. Csányi, On representing chemical "
            "environments, Phys. Rev. B 87, 184115 (2013)"
        )
    metadata = ModelMetadata(
        name="lode-e3nn-energy" if lode else "soap-e3nn-energy",
        description=description,
        references={
            "implementation": [
                "featomic: https://github.com/metatensor/featomic"
                + (" (the LODE spherical expansion this model's reproduces)" if lode else ""),
                "e3nn: M. Geiger and T. Smidt, e3nn: Euclidean Neural Networks, "
                "arXiv:2207.09453 (2022), https://github.com/e3nn/e3nn",
                f"rascaline-e3nn {rascaline_e3nn.__version__}: "
                + ("LodeSphericalExpansion (featomic's LODE in PyTorch) and its to_irreps"
                   if lode else
                   "TensorMapToIrreps, bridges from featomic TensorMaps to e3nn irreps "
                   "tensors"),
                "metatomic: https://github.com/metatensor/metatomic",
            ],
            "architecture": [architecture],
        },
    )
    irreps = model.features.irreps_out
    capabilities = ModelCapabilities(
        outputs={
            "energy": ModelOutput(
                unit="eV",
                sample_kind="atom",
                description="energy (forces and stress by autograd)",
            ),
            SPHERICAL_OUTPUT: ModelOutput(
                sample_kind="atom",
                description=f"the model's e3nn input per atom ({irreps}: "
                f"{'the LODE' if lode else 'featomic SOAP'} spherical expansion, channels = "
                "(neighbor_type, n)), back in metatensor's conventions (keys o3_lambda, "
                "o3_sigma; components o3_mu)",
            ),
        },
        atomic_types=sorted(atom_types),
        # LODE features depend on every atom of the periodic system
        interaction_range=math.inf if lode else max(cutoffs(model)),
        length_unit="angstrom",
        # rascaline_e3nn's LODE computes on the systems' device; featomic on the CPU
        supported_devices=["cpu", "cuda"] if lode else ["cpu"],
        dtype="float64",
    )
    # e3nn's layers are compiled their own way (traced or scripted) before TorchScript
    # scripts the whole model; a featomic calculator stays a Python module, so that
    # metatomic finds the neighbour lists it requests
    compiled = e3nn_compile(copy.deepcopy(model))
    module = MetatomicEnergy(compiled).eval()
    atomistic = AtomisticModel(module, metadata, capabilities)
    atomistic.save(output, collect_extensions=extensions)
    return atomistic


def cutoffs(model: torch.nn.Module) -> List[float]:
    found = [0.0]
    for module in model.modules():
        if type(module).__module__.startswith("featomic"):
            found.extend(getattr(module, "cutoffs", []))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="lode_e3nn_run", help="output directory of the training")
    parser.add_argument(
        "--untrained", action="store_true", help="export a freshly initialised model instead"
    )
    parser.add_argument("--output", default="lode-e3nn.pt", help="where to save the model")
    parser.add_argument(
        "--extensions",
        default="extensions",
        help="where to copy the TorchScript extensions the model needs (engines outside "
        "this Python environment load them from there)",
    )
    parser.add_argument(
        "--featomic",
        action="store_true",
        help="keep featomic's LODE calculator of a run trained with --featomic: refused, "
        "see the module's docstring (by default such a run is exported on "
        "rascaline_e3nn's LODE, with the same weights)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.featomic:
        parser.error(FEATOMIC_LODE_MESSAGE)

    if args.untrained:
        atom_types = [11, 17]
        model = build_model("lode", atom_types)
        description = (
            "UNTRAINED LODE -> e3nn energy model (random weights, for testing engines): "
            "rascaline-e3nn LodeSphericalExpansion to e3nn irreps, e3nn layers"
        )
        print(f"freshly initialised model, atom types {atom_types}")
    else:
        model, scripted, config = load_trained(args.run)
        atom_types = list(config["atom_types"])
        description = (
            "LODE -> e3nn energy model trained by rascaline-e3nn's "
            "examples/train_long_range.py: rascaline-e3nn LodeSphericalExpansion to e3nn "
            "irreps, e3nn layers"
        )
        print(f"model of {args.run}: {config}")
        system = nacl()
        difference = (model([system]) - scripted([system])).abs().max().item()
        saved = os.path.join(args.run, "model.pt")
        print(f"rebuilt model vs {saved} on rattled NaCl: |dE| = {difference:.1e} eV")
        if difference > 1e-10:
            raise ValueError("the rebuilt model does not reproduce the saved one")

    atomistic = export(model, atom_types, args.output, description, args.extensions)
    capabilities = atomistic.capabilities()
    print(f"saved {args.output} (TorchScript extensions in {args.extensions}/)")
    print(
        f"  outputs: energy in {capabilities.outputs['energy'].unit}, {SPHERICAL_OUTPUT} "
        f"({model.features.irreps_out}); atomic types {capabilities.atomic_types}, "
        f"interaction range {capabilities.interaction_range} {capabilities.length_unit}, "
        f"devices {capabilities.supported_devices}, {capabilities.dtype}"
    )
    print("  forces and stress: exact, by autograd through the energy")


if __name__ == "__main__":
    main()
