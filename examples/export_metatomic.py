"""Export the LODE -> e3nn energy model as a metatomic ``AtomisticModel``.

The exported file is meant for the engines that go through metatomic (ASE's
``metatomic_ase.MetatomicCalculator``, LAMMPS, i-PI, ...; ASE's is the one tested here),
with the TorchScript extensions it needs copied to ``--extensions``. Inside: featomic's
``LodeSphericalExpansion`` -> ``TensorMapToIrreps`` -> e3nn layers -> an ``energy``
``TensorMap`` in eV, per system or per atom (``sample_kind="atom"``), restricted to
``selected_atoms`` when the engine asks. A second, per-atom output,
``rascaline-e3nn::irreps``, gives the e3nn input of each atom back as a metatensor
``TensorMap`` through ``IrrepsToTensorMap`` (keys ``o3_lambda, o3_sigma``, components
``o3_mu`` in featomic's basis).

Forces are exact: the engine differentiates the energy with respect to the positions.
The stress is not available: featomic's LODE gives no gradients with respect to the
cell, so the cell derivative of the energy (its reciprocal-space part included) is
unknown. The model hands featomic a cell detached from autograd and adds to the energy
a term that is exactly zero but whose gradient with respect to the cell is NaN: every
stress or virial an engine derives from the cell comes out NaN (with a warning, once
per model), never a finite number missing a part. (A model on featomic's
``SphericalExpansion``, ``build_model("soap", ...)``, keeps the cell: its stress is exact.)

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
import warnings
from typing import Dict, List, Optional

import featomic.torch
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
from common import atom_indices, replace, rock_salt, sum_per_system  # noqa: E402
from lode_model import build_model  # noqa: E402

#: the message of the warning the model emits when an engine asks for cell gradients
STRESS_MESSAGE = (
    "this model cannot compute the stress or virial: featomic's LODE gives no "
    "gradients with respect to the cell, so the cell derivative of the energy (its "
    "reciprocal-space part included) is unknown. Stress and virial come out NaN; "
    "energies and forces are exact."
)


#: name of the per-atom spherical output (metatomic's "<domain>::<name>")
SPHERICAL_OUTPUT = "rascaline-e3nn::irreps"


class MetatomicEnergy(torch.nn.Module):
    """An energy model (``atomic_energies(systems) -> [total atoms]``, eV, holding
    ``calculator`` and ``to_irreps``) with the metatomic model interface:
    ``forward(systems, outputs, selected_atoms)``.

    Outputs: ``energy`` (per system or per atom) and ``SPHERICAL_OUTPUT``, the e3nn
    input of the model per atom (``to_irreps``'s output) back in metatensor's
    conventions through ``IrrepsToTensorMap``: keys ``o3_lambda, o3_sigma``,
    components ``o3_mu`` in featomic's basis, one property per channel.

    With ``cell_gradients=False`` (models with a LODE calculator), systems whose cell
    requires grad reach the model with a detached cell; the energy of periodic ones
    gains ``sqrt((cell - cell.detach())**2).sum()``: zero in value, NaN in its gradient
    with respect to the cell.
    """

    def __init__(self, model: torch.nn.Module, cell_gradients: bool):
        super().__init__()
        self.model = model
        self.to_tensor_map = rascaline_e3nn.IrrepsToTensorMap(
            model.to_irreps.irreps_out, property_name="channel"
        )
        self.spherical_output = SPHERICAL_OUTPUT
        self.cell_gradients = cell_gradients
        self.stress_message = STRESS_MESSAGE
        self.warned = False

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
        device = systems[0].positions.device

        # zero in value; a NaN gradient with respect to each periodic cell that
        # requires grad, which featomic's LODE cannot differentiate
        cell_terms: List[torch.Tensor] = []
        model_systems: List[System] = []
        for system in systems:
            term = torch.zeros((), dtype=system.positions.dtype, device=device)
            if not self.cell_gradients and system.cell.requires_grad:
                if bool(system.pbc.any()):
                    if not self.warned:
                        warnings.warn(self.stress_message)
                        self.warned = True
                    term = torch.sqrt((system.cell - system.cell.detach()) ** 2).sum()
                # a non-periodic system goes on to featomic, whose error names the
                # reason ("LODE can only be used with periodic systems")
                system = replace(system, cell=system.cell.detach())
            cell_terms.append(term)
            model_systems.append(system)

        if "energy" in outputs:
            energies = self.model.atomic_energies(model_systems)
            results["energy"] = self._energy(
                systems, energies, torch.stack(cell_terms), outputs["energy"], selected_atoms
            )
        if self.spherical_output in outputs:
            features = self.model.calculator(model_systems)
            x, rows = self.model.to_irreps.forward_with_samples(features)
            samples = Labels(["system", "atom"], rows.values[:, :2])
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
        cell_terms: torch.Tensor,
        output: ModelOutput,
        selected_atoms: Optional[Labels],
    ) -> TensorMap:
        device = energies.device
        system_index, atom_index = atom_indices(systems)
        energies = energies + cell_terms[system_index]
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


def has_lode(model: torch.nn.Module) -> bool:
    return any(
        isinstance(module, featomic.torch.LodeSphericalExpansion) for module in model.modules()
    )


def load_trained(run: str):
    """Rebuild the model of ``run/model_config.json`` in Python and load the weights of
    ``run/model.pt`` into it; returns the model, the scripted one and the config."""
    with open(os.path.join(run, "model_config.json")) as file:
        config = json.load(file)
    scripted = torch.jit.load(os.path.join(run, "model.pt"))
    model = build_model(**config)
    state = scripted.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a scripted module lists its non-persistent buffers (the adapters' index tables,
    # planned from the hyper-parameters) in its state_dict: they must equal ours
    buffers = dict(model.named_buffers())
    for name in unexpected:
        if name not in buffers or not torch.equal(buffers[name], state[name]):
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
    needs (featomic-torch and its libraries; engines provide metatensor's and
    metatomic's) copied to ``extensions`` when given; returns the ``AtomisticModel``."""
    model = model.eval()
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
                "featomic: https://github.com/metatensor/featomic",
                "e3nn: M. Geiger and T. Smidt, e3nn: Euclidean Neural Networks, "
                "arXiv:2207.09453 (2022), https://github.com/e3nn/e3nn",
                f"rascaline-e3nn {rascaline_e3nn.__version__}: TensorMapToIrreps, "
                "bridges from featomic TensorMaps to e3nn irreps tensors",
                "metatomic: https://github.com/metatensor/metatomic",
            ],
            "architecture": [architecture],
        },
    )
    irreps = model.to_irreps.irreps_out
    capabilities = ModelCapabilities(
        outputs={
            "energy": ModelOutput(
                unit="eV",
                sample_kind="atom",
                description="energy; stress and virial are NaN (LODE has no cell gradients)"
                if lode
                else "energy",
            ),
            SPHERICAL_OUTPUT: ModelOutput(
                sample_kind="atom",
                description=f"the model's e3nn input per atom ({irreps}: featomic's "
                f"{'LODE' if lode else 'SOAP'} spherical expansion, channels = "
                "(neighbor_type, n)), back in metatensor's conventions (keys o3_lambda, "
                "o3_sigma; components o3_mu)",
            ),
        },
        atomic_types=sorted(atom_types),
        # LODE features depend on every atom of the periodic system
        interaction_range=math.inf if lode else max(cutoffs(model)),
        length_unit="angstrom",
        # featomic computes on the CPU only
        supported_devices=["cpu"],
        dtype="float64",
    )
    # e3nn's layers are compiled their own way (traced or scripted) before TorchScript
    # scripts the whole model; the featomic calculator stays a Python module, so that
    # metatomic finds the neighbour lists it requests
    compiled = e3nn_compile(copy.deepcopy(model))
    module = MetatomicEnergy(compiled, cell_gradients=not lode).eval()
    atomistic = AtomisticModel(module, metadata, capabilities)
    atomistic.save(output, collect_extensions=extensions)
    return atomistic


def cutoffs(model: torch.nn.Module) -> List[float]:
    found = [0.0]
    for module in model.modules():
        if isinstance(module, featomic.torch.CalculatorModule):
            found.extend(module.cutoffs)
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
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.untrained:
        atom_types = [11, 17]
        model = build_model("lode", atom_types)
        description = (
            "UNTRAINED LODE -> e3nn energy model (random weights, for testing engines): "
            "featomic LODE spherical expansion, rascaline-e3nn TensorMapToIrreps, e3nn layers"
        )
        print(f"freshly initialised model, atom types {atom_types}")
    else:
        model, scripted, config = load_trained(args.run)
        atom_types = list(config["atom_types"])
        description = (
            "LODE -> e3nn energy model trained by rascaline-e3nn's "
            "examples/train_long_range.py: featomic LODE spherical expansion, "
            "rascaline-e3nn TensorMapToIrreps, e3nn layers"
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
        f"({model.to_irreps.irreps_out}); atomic types {capabilities.atomic_types}, "
        f"interaction range {capabilities.interaction_range} {capabilities.length_unit}, "
        f"devices {capabilities.supported_devices}, {capabilities.dtype}"
    )
    if has_lode(model):
        print("  stress and virial: NaN, with a warning (LODE has no cell gradients)")


if __name__ == "__main__":
    main()
