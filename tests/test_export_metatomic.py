"""The metatomic export of ``examples/export_metatomic.py``, through metatomic's own
loader and checker and through ASE's ``MetatomicCalculator``: energies, exact forces
and stress (against finite differences), invariance, MD; a file that loads without
featomic or this package."""

import json
import os
import subprocess
import sys

import ase
import numpy as np
import pytest
import torch
from ase import units
from ase.md.verlet import VelocityVerlet
from e3nn import o3
from metatensor.torch import Labels
from metatomic.torch import (
    ModelEvaluationOptions,
    ModelOutput,
    System,
    check_atomistic_model,
    load_atomistic_model,
)
from metatomic_ase import MetatomicCalculator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from export_metatomic import (  # noqa: E402
    FEATOMIC_LODE_MESSAGE,
    SPHERICAL_OUTPUT,
    MetatomicEnergy,
    export,
    load_trained,
    nacl,
)
from common import rock_salt_atoms, system_from_ase  # noqa: E402
from lode_model import build_model, model_config, save_model  # noqa: E402
from _systems import DEVICES  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def export_run(directory, kind, hypers):
    """Save a tiny untrained model as a training run would (``model.pt``,
    ``model_config.json``; random weights on every path, energies made larger than
    initialisation's so that forces, stress and MD are not trivially small), export it
    with ``export_metatomic.py --run`` in a fresh process (metatomic collects every
    TorchScript extension loaded in the exporting process), and return the rebuilt
    model, the exported file and its extensions directory."""
    torch.manual_seed(0)
    config = model_config(kind, [11, 17], hypers, hidden=4, mul=2)
    model = build_model(**config)
    with torch.no_grad():
        # every path contributes (an untrained head starts its non-linear one at zero)
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        model.energy_scale.fill_(20.0)
    save_model(model, config, str(directory))
    path, extensions = str(directory / "exported.pt"), str(directory / "extensions")
    subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "export_metatomic.py"), "--run",
         str(directory), "--output", path, "--extensions", extensions],
        check=True, capture_output=True,
    )
    return load_trained(str(directory))[0], path, extensions


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny untrained LODE model (lmax 1, 2 radial functions) and its export."""
    return export_run(tmp_path_factory.mktemp("lode"), "lode",
                      {"max_angular": 1, "max_radial": 1})


def crystal(seed=0, rattle=0.1):
    return rock_salt_atoms(rattle=rattle, seed=seed)


def calculator(exported, **kwargs):
    """A fresh MetatomicCalculator (default settings) on the exported file."""
    _, path, extensions = exported
    return MetatomicCalculator(path, extensions_directory=extensions, **kwargs)


def evaluate(atoms, calc):
    """Energy and forces."""
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def strain_derivatives(atoms, calc, pairs, h=1e-5):
    """Central finite differences of the energy per volume under the symmetric strains
    ``eps[i, j] = eps[j, i]`` (``atoms.set_cell(cell @ (I + eps), scale_atoms=True)``):
    the stress ``sigma[i, j]`` (eV/Å^3) for each ``(i, j)`` of ``pairs``."""
    numerical = {}
    for i, j in pairs:
        shifted = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / 2
            strain[j, i] += sign * h / 2
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            deformed.calc = calc
            shifted.append(deformed.get_potential_energy())
        numerical[i, j] = (shifted[0] - shifted[1]) / (2 * h) / atoms.get_volume()
    return numerical


def test_loads_and_checks_in_a_fresh_process(exported):
    model, path, extensions = exported
    script = """
import json, sys
import torch
from metatomic.torch import (check_atomistic_model, load_atomistic_model,
                             ModelEvaluationOptions, ModelOutput, System)
path, extensions = sys.argv[1:3]
loaded = load_atomistic_model(path, extensions_directory=extensions)
check_atomistic_model(path)
assert "rascaline_e3nn" not in sys.modules and "lode_model" not in sys.modules
assert "featomic" not in sys.modules and "e3nn" not in sys.modules
data = json.loads(sys.stdin.read())
system = System(types=torch.tensor(data["types"]),
                positions=torch.tensor(data["positions"], dtype=torch.float64),
                cell=torch.tensor(data["cell"], dtype=torch.float64),
                pbc=torch.tensor([True, True, True]))
options = ModelEvaluationOptions(length_unit="angstrom",
                                 outputs={"energy": ModelOutput(unit="eV")})
energy = loaded([system], options, check_consistency=True)["energy"].block().values
metadata = loaded.metadata()
print(json.dumps({"energy": energy.item(), "name": metadata.name,
                  "references": metadata.references,
                  "range": str(loaded.capabilities().interaction_range),
                  "devices": loaded.capabilities().supported_devices,
                  "dtype": loaded.capabilities().dtype}))
"""
    system = nacl(rattle=0.2, seed=3)
    data = {"types": system.types.tolist(), "positions": system.positions.tolist(),
            "cell": system.cell.tolist()}
    result = subprocess.run(
        [sys.executable, "-c", script, path, extensions],
        input=json.dumps(data), capture_output=True, text=True, check=True,
    )
    out = json.loads(result.stdout)
    expected = model([system]).item()
    assert abs(out["energy"] - expected) < 1e-12 * max(1.0, abs(expected))
    assert out["range"] == "inf"
    assert out["devices"] == ["cpu", "cuda"] and out["dtype"] == "float64"
    references = " ".join(sum(out["references"].values(), []))
    for name in ("featomic", "e3nn", "rascaline-e3nn", "LODE"):
        assert name in references


def test_spherical_output_is_featomic_expansion_in_metatensor_conventions(exported):
    """The per-atom spherical output, against featomic's own LODE blocks (which follow
    metatensor's conventions): for each atom and l, the neighbour types' blocks side
    by side; selected_atoms honoured."""
    import featomic.torch

    model, path, extensions = exported
    loaded = load_atomistic_model(path, extensions_directory=extensions)
    systems = [nacl(rattle=0.2, seed=12), nacl(rattle=0.2, seed=13)]
    selected = Labels(["system", "atom"],
                      torch.tensor([[0, 1], [0, 6], [1, 3], [1, 4]], dtype=torch.int32))
    options = ModelEvaluationOptions(
        length_unit="angstrom", selected_atoms=selected,
        outputs={SPHERICAL_OUTPUT: ModelOutput(sample_kind="atom")},
    )
    output = loaded(systems, options, check_consistency=True)[SPHERICAL_OUTPUT]
    featomic_map = featomic.torch.LodeSphericalExpansion(
        **json.loads(model.features.calculator.parameters))(systems)

    assert output.keys.names == ["o3_lambda", "o3_sigma"]
    assert output.keys.values.tolist() == [[0, 1], [1, 1]]
    for l in (0, 1):
        block = output.block({"o3_lambda": l, "o3_sigma": 1})
        assert block.components[0].names == ["o3_mu"]
        assert block.components[0].values.reshape(-1).tolist() == list(range(-l, l + 1))
        assert torch.equal(block.samples.values, selected.values)
        for row, (s, a) in enumerate(selected.values.tolist()):
            center = int(systems[s].types[a])
            expected = []
            for neighbor in (11, 17):
                reference = featomic_map.block({"o3_lambda": l, "o3_sigma": 1,
                                                "center_type": center,
                                                "neighbor_type": neighbor})
                position = reference.samples.position([s, a])
                expected.append(reference.values[position])
            torch.testing.assert_close(block.values[row], torch.cat(expected, dim=-1),
                                       rtol=0, atol=1e-12)


def test_load_trained_rebuilds_the_saved_model(exported, tmp_path):
    model, _, _ = exported
    hypers = {"max_angular": 1, "max_radial": 1}
    save_model(model, model_config("lode", [11, 17], hypers, hidden=4, mul=2), str(tmp_path))
    rebuilt, scripted, config = load_trained(str(tmp_path))
    assert config["atom_types"] == [11, 17]
    system = nacl(rattle=0.2, seed=11)
    assert torch.equal(rebuilt([system]), model([system]))

    # a config that does not describe model.pt is refused
    with open(tmp_path / "model_config.json", "w") as file:
        json.dump(model_config("lode", [11, 17], {"max_angular": 1, "max_radial": 2},
                               hidden=4, mul=2), file)
    with pytest.raises((ValueError, RuntimeError)):
        load_trained(str(tmp_path))


def test_check_atomistic_model(exported):
    check_atomistic_model(exported[1])


def test_energies_per_atom_and_selected_atoms(exported):
    model, _, _ = exported
    module = MetatomicEnergy(model)
    systems = [nacl(rattle=0.2, seed=1), nacl(rattle=0.2, seed=2)]
    expected = model.atomic_energies(systems).detach()

    per_atom = module(systems, {"energy": ModelOutput(unit="eV", sample_kind="atom")})
    block = per_atom["energy"].block()
    assert block.samples.names == ["system", "atom"]
    system_column = torch.tensor([0] * 8 + [1] * 8, dtype=torch.int32)
    assert torch.equal(block.samples.values[:, 0], system_column)
    assert torch.equal(block.samples.values[:, 1], torch.arange(8, dtype=torch.int32).repeat(2))
    torch.testing.assert_close(block.values.reshape(-1), expected, rtol=0, atol=1e-14)

    selected = Labels(["system", "atom"], torch.tensor([[0, 2], [1, 0], [1, 7]], dtype=torch.int32))
    chosen = expected[torch.tensor([2, 8, 15])]
    per_atom = module(systems, {"energy": ModelOutput(unit="eV", sample_kind="atom")}, selected)
    assert torch.equal(per_atom["energy"].block().samples.values, selected.values)
    torch.testing.assert_close(per_atom["energy"].block().values.reshape(-1), chosen,
                               rtol=0, atol=1e-14)
    totals = module(systems, {"energy": ModelOutput(unit="eV")}, selected)["energy"].block()
    expected_totals = torch.stack([chosen[0], chosen[1:].sum()])
    torch.testing.assert_close(totals.values.reshape(-1), expected_totals, rtol=0, atol=1e-14)
    assert module(systems, {}) == {}

    # the same through the saved file, with metatomic's consistency checks
    _, path, extensions = exported
    loaded = load_atomistic_model(path, extensions_directory=extensions)
    for sample_kind, expected_values in (("atom", chosen), ("system", totals.values.reshape(-1))):
        options = ModelEvaluationOptions(
            length_unit="angstrom", selected_atoms=selected,
            outputs={"energy": ModelOutput(unit="eV", sample_kind=sample_kind)},
        )
        values = loaded(systems, options, check_consistency=True)["energy"].block().values
        torch.testing.assert_close(values.reshape(-1), expected_values, rtol=0, atol=1e-12)


def test_ase_energy_forces_against_finite_differences(exported):
    model, _, _ = exported
    atoms = crystal(seed=4)
    energy, forces = evaluate(atoms, calculator(exported))
    system = system_from_ase(atoms)
    assert abs(energy - model([system]).item()) < 1e-12 * max(1.0, abs(energy))
    assert np.isfinite(forces).all() and np.abs(forces).max() > 1e-3
    per_atom = atoms.get_potential_energies()
    np.testing.assert_allclose(per_atom, model.atomic_energies([system]).detach().numpy(),
                               rtol=0, atol=1e-12)
    assert abs(per_atom.sum() - energy) < 1e-12 * max(1.0, abs(energy))

    h = 1e-4
    reference = atoms.copy()
    fresh = calculator(exported, do_gradients_with_energy=False)
    for atom, direction in [(0, 0), (3, 1), (5, 2), (7, 0)]:
        shifted = []
        for sign in (1, -1):
            moved = reference.copy()
            moved.positions[atom, direction] += sign * h
            moved.calc = fresh
            shifted.append(moved.get_potential_energy())
        numerical = -(shifted[0] - shifted[1]) / (2 * h)
        assert abs(forces[atom, direction] - numerical) < 1e-7, (atom, direction)


def test_non_periodic_systems_are_refused_with_the_reason(exported):
    atoms = ase.Atoms("NaCl", positions=[[0, 0, 0], [2.5, 0, 0]])
    atoms.calc = calculator(exported)
    # (a TorchScript error: torch.jit.Error)
    with pytest.raises(Exception, match="LODE can only be used with periodic systems"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("improper", [False, True])
def test_ase_rotations(exported, float64_default, improper):
    atoms = crystal(seed=5)
    energy, forces = evaluate(atoms, calculator(exported))

    R = o3.rand_matrix().numpy()
    if improper:
        R = -R
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ R.T
    cell = atoms.cell.array @ R.T
    if np.linalg.det(cell) < 0:  # the same lattice, right-handed cell vectors
        cell[0] = -cell[0]
    rotated.set_cell(cell, scale_atoms=False)
    rotated_energy, rotated_forces = evaluate(rotated, calculator(exported))

    assert abs(rotated_energy - energy) < 1e-10 * max(1.0, abs(energy))
    np.testing.assert_allclose(rotated_forces, forces @ R.T, rtol=0, atol=1e-10)


def test_ase_nve_conserves_energy(exported):
    atoms = crystal(seed=6)
    atoms.calc = calculator(exported)
    rng = np.random.default_rng(0)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * 600))
    atoms.get_potential_energy()

    potentials, totals = [], []

    def record():
        potentials.append(atoms.get_potential_energy())
        totals.append(potentials[-1] + atoms.get_kinetic_energy())

    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dynamics.attach(record, interval=1)
    dynamics.run(10)
    potentials, totals = np.array(potentials), np.array(totals)
    # the atoms move: the potential energy changes, the total energy does not
    assert np.ptp(potentials) > 1e-4
    assert np.abs(totals - totals[0]).max() < 1e-3 * np.ptp(potentials)


def test_ase_stress_is_the_strain_derivative_of_the_energy(exported):
    """The stress metatomic-ase computes (autograd through the cell, the LODE's
    reciprocal-space sum included) against central finite differences of the energy
    under strain, diagonal and shear; no warning."""
    atoms = crystal(seed=7)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.03, 0.0], [0.0, 0.98, 0.02],
                                                 [0.01, 0.0, 1.02]]), scale_atoms=True)
    atoms.calc = calculator(exported)
    stress = atoms.get_stress(voigt=False)
    assert np.isfinite(stress).all() and np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, stress.T, rtol=0, atol=1e-12)
    numerical = strain_derivatives(atoms, calculator(exported, do_gradients_with_energy=False),
                                   [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)])
    for (i, j), value in numerical.items():
        assert abs(stress[i, j] - value) < 1e-7 * max(1.0, np.abs(stress).max()), (i, j)

    # directly through metatomic's loader: the cell gradient is finite, the forces too
    _, path, extensions = exported
    loaded = load_atomistic_model(path, extensions_directory=extensions)
    system = nacl(rattle=0.1, seed=8)
    cell = system.cell.clone().requires_grad_(True)
    positions = system.positions.clone().requires_grad_(True)
    system = System(types=system.types, positions=positions, cell=cell, pbc=system.pbc)
    options = ModelEvaluationOptions(length_unit="angstrom",
                                     outputs={"energy": ModelOutput(unit="eV")})
    energy = loaded([system], options, check_consistency=True)["energy"].block().values
    energy.sum().backward()
    assert torch.isfinite(cell.grad).all() and cell.grad.abs().max() > 0
    assert torch.isfinite(positions.grad).all()


def test_featomic_lode_is_exported_on_ours_or_refused(tmp_path):
    """A model trained on featomic's LODE is rebuilt on rascaline_e3nn's (same
    weights, same energies); featomic's calculator itself is refused for export."""
    torch.manual_seed(1)
    config = model_config("lode-featomic", [11, 17], {"max_angular": 1, "max_radial": 1},
                          hidden=4, mul=2)
    model = build_model(**config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    save_model(model, config, str(tmp_path))
    ours, scripted, _ = load_trained(str(tmp_path))
    assert type(ours.features.calculator).__module__.startswith("rascaline_e3nn")
    systems = [nacl(rattle=0.2, seed=14)]
    torch.testing.assert_close(ours(systems), scripted(systems), rtol=0, atol=1e-10)

    theirs, _, _ = load_trained(str(tmp_path), keep_featomic=True)
    with pytest.raises(ValueError, match="no gradients with respect to the cell"):
        export(theirs, [11, 17], str(tmp_path / "refused.pt"), "refused")
    assert "cell" in FEATOMIC_LODE_MESSAGE


@pytest.mark.parametrize("device", DEVICES)
# featomic-torch computes on the CPU and says so when the systems are elsewhere
@pytest.mark.filterwarnings("ignore:.*calculations on CPU.*:UserWarning")
def test_engine_moves_the_model(exported, device):
    """What metatomic-ase does: ``model.to(device=...)`` on the loaded file, then
    float64 systems on that device; same energy and forces as the in-process model."""
    model, path, extensions = exported
    loaded = load_atomistic_model(path, extensions_directory=extensions).to(device=device)
    reference = nacl(rattle=0.2, seed=9)
    positions = reference.positions.clone().requires_grad_(True)
    expected = model([System(types=reference.types, positions=positions,
                             cell=reference.cell, pbc=reference.pbc)])
    (expected_forces,) = torch.autograd.grad(-expected.sum(), positions)

    positions = reference.positions.to(device).requires_grad_(True)
    system = System(types=reference.types.to(device), positions=positions,
                    cell=reference.cell.to(device), pbc=reference.pbc.to(device))
    options = ModelEvaluationOptions(length_unit="angstrom",
                                     outputs={"energy": ModelOutput(unit="eV", sample_kind="atom")})
    block = loaded([system], options, check_consistency=True)["energy"].block()
    assert block.values.device.type == device and block.samples.device.type == device
    energy = block.values.sum()
    (forces,) = torch.autograd.grad(-energy, positions)
    assert abs(energy.item() - expected.item()) < 1e-12 * max(1.0, abs(expected.item()))
    torch.testing.assert_close(forces.cpu(), expected_forces, rtol=0, atol=1e-12)


def test_short_range_model_has_the_exact_stress(tmp_path):
    """A model on featomic's SphericalExpansion (which differentiates the cell) keeps
    the engine's cell: its stress is the strain derivative of the energy."""
    _, path, extensions = export_run(tmp_path, "soap",
                                     {"cutoff": 3.5, "max_angular": 1, "max_radial": 1})
    assert load_atomistic_model(path, extensions).capabilities().interaction_range == 3.5

    assert load_atomistic_model(path, extensions).capabilities().supported_devices == ["cpu"]

    atoms = crystal(seed=10)
    atoms.calc = MetatomicCalculator(path, extensions_directory=extensions)
    stress = atoms.get_stress(voigt=False)
    assert np.abs(stress).max() > 1e-4

    fresh = MetatomicCalculator(path, extensions_directory=extensions,
                                do_gradients_with_energy=False)
    numerical = strain_derivatives(atoms, fresh, [(0, 0), (1, 1), (0, 1), (1, 2)])
    for (i, j), value in numerical.items():
        assert abs(stress[i, j] - value) < 1e-6, (i, j)


def test_md_example_npt_changes_the_cell(exported, capsys):
    """examples/md_ase.py: a few NVE and NPT (Berendsen barostat) steps on the exported
    model; the barostat moves the cell from the model's stress, and everything stays
    finite."""
    import md_ase

    _, path, extensions = exported
    results = md_ase.main([path, "--extensions", extensions, "--ensemble", "both",
                           "--steps", "4", "--print-every", "2", "--taup", "20"])
    printed = capsys.readouterr().out
    assert "NVE" in printed and "NPT" in printed and "time per step" in printed
    nve, npt = results["nve"], results["npt"]
    assert len(npt["volume"]) == 5 and len(nve["volume"]) == 5
    for series in (nve, npt):
        for name in ("volume", "pressure_gpa", "temperature", "potential", "total"):
            assert np.isfinite(series[name]).all(), name
    assert len(set(nve["volume"])) == 1
    assert abs(npt["volume"][-1] - npt["volume"][0]) > 1e-3
    # isotropic: the cubic cell stays cubic
    cell = npt["cell"][-1]
    np.testing.assert_allclose(cell, np.eye(3) * cell[0, 0], rtol=0, atol=1e-12)
    assert cell[0, 0] != npt["cell"][0][0, 0]


def test_born_mayer_repulsion_against_finite_differences():
    """The repulsion md_ase.py adds: forces and stress are derivatives of its energy,
    and with point charges it puts rock salt in equilibrium at a = 5.64 Å."""
    import md_ase

    atoms = crystal(seed=3, rattle=0.1)
    atoms.calc = md_ase.BornMayer.for_rock_salt()
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=False)
    h = 1e-5
    for atom, axis in [(0, 0), (5, 2)]:
        shifted = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * h
            moved.calc = md_ase.BornMayer.for_rock_salt()
            shifted.append(moved.get_potential_energy())
        assert abs(-(shifted[0] - shifted[1]) / (2 * h) - forces[atom, axis]) < 1e-6
    numerical = strain_derivatives(atoms, md_ase.BornMayer.for_rock_salt(),
                                   [(0, 0), (1, 2)])
    for (i, j), value in numerical.items():
        assert abs(stress[i, j] - value) < 1e-7, (i, j)

    # equilibrium: d/da [Madelung + repulsion] = 0 at 5.64 Å (nearest neighbours dominate)
    def energy(a):
        crystal_a = rock_salt_atoms(a=a)
        crystal_a.calc = md_ase.BornMayer.for_rock_salt()
        madelung = -md_ase.MADELUNG * md_ase.COULOMB / (a / 2) * len(crystal_a) / 2
        return crystal_a.get_potential_energy() + madelung

    slope = (energy(5.64 + 1e-4) - energy(5.64 - 1e-4)) / 2e-4
    assert abs(slope) < 0.05
