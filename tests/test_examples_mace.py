"""``examples/mace_blocks.py``: MACE's interaction and product blocks on LODE node
features and vesin edges, run in a tiny configuration.

mace-torch pins e3nn 0.4.4, so the default test environment (e3nn 0.6) does not have
it and this file is skipped there, with its reason; ``.ci/run``'s e3nn 0.4.4 step
installs mace-torch and runs it."""

import importlib.util
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mace") is None,
    reason="mace-torch is not installed (it pins e3nn 0.4.4; .ci/run's e3nn 0.4.4 step "
    "installs it and runs this file)",
)

TINY = ["--channels", "2", "--max-ell", "1", "--correlation", "2", "--max-angular", "1",
        "--max-radial", "1", "--rotations", "1", "--quiet"]


@pytest.fixture(scope="module")
def mace_blocks():
    before = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    sys.path.insert(0, EXAMPLES)
    import mace_blocks

    # importing mace sets this for the whole process; the example restores it
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == before
    return mace_blocks


def test_tiny_run_is_equivariant(mace_blocks, tmp_path):
    import e3nn

    result = mace_blocks.main(TINY + ["--plot", str(tmp_path / "errors.png")])
    assert (tmp_path / "errors.png").stat().st_size > 0
    assert result["e3nn"] == e3nn.__version__
    for kind in ("proper", "improper"):
        errors = result["errors"][kind]
        assert errors["energy"] < 1e-10 and errors["forces"] < 1e-10
        assert errors["per_atom"] < 1e-10
    # the check can fail: a reference that ignores the outputs' parity is caught
    assert result["errors"]["improper"]["per_atom_parity_ignored"] > 1e-3
    assert result["n_edges"] > 0 and any(abs(e) > 0 for e in result["energies"])


@pytest.mark.filterwarnings(
    "ignore:The TorchScript type system doesn't support instance-level annotations"
    ":UserWarning")
def test_mace_layers_see_the_lode_features(mace_blocks, float64_default):
    """The LODE features reach MACE's blocks: changing only the far-away part of the
    structure (an atom beyond the edge cutoff of every other) changes the energy of
    atoms it shares no edge with, through LODE alone."""
    import torch

    systems = mace_blocks.structures()
    model = mace_blocks.LodeMace([1, 8, 11, 17], channels=2, max_ell=1, correlation=2,
                                 max_angular=1, max_radial=1, cutoff=1.2)
    edge_index, _ = mace_blocks.batch_edges(systems, 1.2, True)
    x = model(systems).detach()
    # move the sodium of the water box (its last atom) by 0.3 Å
    water = systems[0]
    positions = water.positions.clone()
    positions[-1] += torch.tensor([0.3, 0.0, 0.0], dtype=positions.dtype)
    moved = mace_blocks.System(types=water.types, positions=positions, cell=water.cell,
                               pbc=water.pbc)
    y = model([moved, systems[1]]).detach()
    neighbours = set(edge_index[1][edge_index[0] == 6].tolist())
    others = [i for i in range(6) if i not in neighbours]
    assert others, "every atom is a neighbour of the sodium: choose a smaller cutoff"
    assert (y[others] - x[others]).abs().max() > 1e-8
