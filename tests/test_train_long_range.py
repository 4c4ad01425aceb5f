"""The main example, ``examples/train_long_range.py``, and its model
(``examples/lode_model.py``), run in tiny configurations so that they cannot rot."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from metatomic.torch import System

from _systems import accurate_rotations, rotate

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)

import lode_model  # noqa: E402
import train_long_range  # noqa: E402

#: e^2 / (4 pi epsilon_0) in eV Å, from the SI values of e and epsilon_0
COULOMB = 1.602176634e-19 / (4 * math.pi * 8.8541878128e-12) * 1e10


@pytest.mark.parametrize("repeat", [1, 2])
@pytest.mark.parametrize("a", [5.64, 4.0])
def test_ewald_target_gives_the_madelung_constant(repeat, a):
    system = train_long_range.rock_salt(a=a, repeat=repeat)
    energy = float(train_long_range.ewald(system))
    n_pairs = len(system) // 2
    madelung = -energy / n_pairs * (a / 2) / COULOMB
    assert abs(madelung - 1.747565) < 1e-6


def test_ewald_forces_vanish_on_the_crystal_and_match_finite_differences():
    crystal = train_long_range.rock_salt()
    _, forces = train_long_range.ewald_energy_and_forces(crystal)
    assert forces.abs().max() < 1e-8

    generator = torch.Generator().manual_seed(1)
    system = train_long_range.random_box(generator, 3, 0.03, 2.0)
    _, forces = train_long_range.ewald_energy_and_forces(system)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 2)]:
        energies = []
        for sign in (1, -1):
            positions = system.positions.clone()
            positions[atom, axis] += sign * h
            energies.append(float(train_long_range.ewald(
                System(types=system.types, positions=positions, cell=system.cell,
                       pbc=system.pbc))))
        assert abs(-(energies[0] - energies[1]) / (2 * h) - forces[atom, axis]) < 1e-6


def test_random_boxes_are_neutral_varied_and_keep_their_distance():
    systems, energies, forces = train_long_range.make_dataset(
        12, seed=3, min_distance=2.2, progress=False)
    sides = {round(float(s.cell[0, 0]), 6) for s in systems}
    sizes = {len(s) for s in systems}
    assert len(sides) == 12 and len(sizes) > 1
    for s, f in zip(systems, forces):
        assert (s.types == 11).sum() == (s.types == 17).sum()
        side = float(s.cell[0, 0])
        delta = s.positions[:, None] - s.positions[None]
        delta -= side * torch.round(delta / side)
        distances = delta.norm(dim=-1) + 1e9 * torch.eye(len(s))
        assert distances.min() >= 2.2
        assert f.shape == (len(s), 3)
    assert (energies < 0).all()
    again = train_long_range.make_dataset(12, seed=3, min_distance=2.2, progress=False)[1]
    assert torch.equal(energies, again)


def _random_system(seed):
    generator = torch.Generator().manual_seed(seed)
    return train_long_range.random_box(generator, 3, 0.03, 2.0)


@pytest.mark.parametrize("kind", ["lode", "lode-featomic", "soap"])
def test_model_contract(kind, float64_default):
    model = lode_model.build_model(kind, [11, 17])
    # a non-zero non-linear path, so that the test sees the e3nn layers
    torch.nn.init.normal_(model.head.mlp[-1].weight)
    systems = [_random_system(0), _random_system(1)]
    energies = model(systems)
    atomic = model.atomic_energies(systems)
    assert energies.shape == (2,) and atomic.shape == (12,)
    assert torch.allclose(atomic.split([6, 6])[0].sum(), energies[0], atol=1e-12)
    assert torch.allclose(atomic.split([6, 6])[1].sum(), energies[1], atol=1e-12)
    # from descriptors computed beforehand (the training path)
    x, species, system, _ = model.rows(systems)
    from_rows = torch.zeros(2).index_add(0, system, model.energies_from_irreps(x, species))
    assert torch.allclose(from_rows, energies, atol=1e-12)
    # atoms in their order: swapping two atoms of a system swaps their energies
    s = systems[0]
    order = torch.tensor([1, 0, 2, 3, 4, 5])
    swapped = System(types=s.types[order], positions=s.positions[order], cell=s.cell,
                     pbc=s.pbc)
    assert torch.allclose(model.atomic_energies([swapped]), atomic[:6][order], atol=1e-12)

    scripted = lode_model.script_model(model)
    assert torch.allclose(scripted(systems), energies, atol=1e-12)
    assert torch.allclose(scripted.atomic_energies(systems), atomic, atol=1e-12)

    (R,) = accurate_rotations(1)
    rotated = rotate(s, R)
    assert torch.allclose(model([rotated]), energies[:1], atol=1e-10)


def test_lode_kinds_agree_and_share_weights(float64_default):
    """rascaline_e3nn's LODE (direct to irreps) and featomic's (through a TensorMap)
    give the same rows, and a model of one kind runs with the weights of the other."""
    torch.manual_seed(0)
    ours = lode_model.build_model("lode", [11, 17])
    torch.nn.init.normal_(ours.head.mlp[-1].weight)
    theirs = lode_model.build_model("lode-featomic", [11, 17])
    missing, _ = theirs.load_state_dict(ours.state_dict(), strict=False)
    # only the descriptors' own tables differ: head and normalisation are shared
    assert all(name.startswith("features.") for name in missing)
    systems = [_random_system(2), _random_system(3)]
    x, species, system, atom = ours.rows(systems)
    x_ref, species_ref, system_ref, atom_ref = theirs.rows(systems)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-12)
    for a, b in [(species, species_ref), (system, system_ref), (atom, atom_ref)]:
        assert torch.equal(a, b)
    torch.testing.assert_close(ours(systems), theirs(systems), rtol=0, atol=1e-12)


def test_example_tiny_run(tmp_path, float64_default):
    output = tmp_path / "run"
    metrics = train_long_range.main([
        "--n-structures", "8", "--epochs", "2", "--batch-size", "4",
        "--output", str(output), "--quiet",
    ])
    for name in ("metrics.json", "learning_curve.png", "model.pt", "model_config.json"):
        assert (output / name).stat().st_size > 0
    written = json.loads((output / "metrics.json").read_text())
    assert written["n_structures"] == 8 and written["n_train"] + written["n_test"] == 8
    assert written["n_atoms"] == metrics["n_atoms"]
    assert written["lode_implementation"] == "rascaline_e3nn"
    for key in ("lode_test_energy_mae", "soap_test_energy_mae", "lode_test_force_mae",
                "seconds_lode_descriptors", "seconds_soap_descriptors", "seconds_e3nn"):
        assert math.isfinite(written[key]) and written[key] >= 0, key
    assert len(written["history"]["lode"]["test"]) == 3  # epoch 0, then 2 epochs
    # the fresh process's checks (main asserts them too)
    check = written["reloaded_model"]
    assert check["energy_difference"] < 1e-10
    assert check["rotation_energy_error"] < 1e-8

    # model_config.json rebuilds the architecture of model.pt
    config = json.loads((output / "model_config.json").read_text())
    saved = torch.jit.load(str(output / "model.pt"))
    rebuilt = lode_model.build_model(**config)
    # (a scripted module's state_dict also holds the adapter's non-persistent tables)
    state = saved.state_dict()
    assert set(rebuilt.state_dict()) <= set(state)
    rebuilt.load_state_dict({k: state[k] for k in rebuilt.state_dict()})
    systems = [_random_system(4), _random_system(5)]
    assert torch.allclose(rebuilt(systems), saved(systems), atol=1e-12)


def test_example_force_training_tiny_run(tmp_path, float64_default):
    metrics = train_long_range.main([
        "--n-structures", "6", "--epochs", "1", "--batch-size", "3", "--forces",
        "--output", str(tmp_path), "--quiet", "--no-check",
    ])
    assert metrics["forces_in_loss"] and math.isfinite(metrics["lode_test_force_mae"])
    # the force loss moved the weights
    assert metrics["history"]["lode"]["train"][1] != metrics["history"]["lode"]["train"][0]


def test_example_featomic_tiny_run(tmp_path, float64_default):
    """--featomic: featomic's LODE, the saved model reloaded with featomic imported."""
    metrics = train_long_range.main([
        "--n-structures", "6", "--epochs", "1", "--batch-size", "3", "--featomic",
        "--output", str(tmp_path), "--quiet",
    ])
    assert metrics["lode_implementation"] == "featomic"
    assert metrics["reloaded_model"]["energy_difference"] < 1e-10
    config = json.loads((tmp_path / "model_config.json").read_text())
    assert config["kind"] == "lode-featomic"


def test_distributed_tiny_run_keeps_ranks_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(EXAMPLES),
                                           os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", "2", os.path.join(EXAMPLES, "train_long_range.py"),
         "--distributed", "--n-structures", "8", "--epochs", "1", "--batch-size", "2",
         "--output", str(tmp_path), "--quiet", "--no-check"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["max_weight_difference_across_ranks"] == 0.0
    # the training moved the weights away from their initial values on every rank
    assert metrics["history"]["lode"]["train"][1] != metrics["history"]["lode"]["train"][0]
