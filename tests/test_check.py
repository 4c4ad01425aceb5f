"""rascaline_e3nn.check: the measured Wigner-D matrices, as a function and a CLI."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from e3nn import o3

from rascaline_e3nn.check import _fit, check_conventions, main

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def rows():
    return check_conventions()


def test_rows_cover_every_basis_irrep_and_rotation_kind(rows):
    keys = {(r["basis"], r["irrep"], r["rotation"]) for r in rows}
    assert len(keys) == len(rows) == 2 * 5 * 2
    assert {r["irrep"] for r in rows} == {"0e", "1o", "2e", "3o", "4e"}
    assert {r["rotation"] for r in rows} == {"proper", "improper"}


def test_e3nn_basis_has_e3nn_matrices(rows):
    for r in rows:
        if r["basis"] == "e3nn":
            assert r["error_e3nn_D"] < 1e-10, r
            if r["l"] >= 1:
                assert r["error_featomic_D"] > 0.1, r


def test_featomic_basis_has_featomic_matrices(rows):
    for r in rows:
        if r["basis"] == "featomic":
            # its own matrices, C^T D_e3nn C, always hold
            assert r["error_featomic_D"] < 1e-10, r
            if r["l"] == 0:
                assert r["error_e3nn_D"] < 1e-10, r
            else:
                assert r["error_e3nn_D"] > 0.1, r


def test_default_dtype_is_restored():
    default = torch.get_default_dtype()
    check_conventions(n_rotations=1, hypers={
        "density": {"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
        "basis": {"type": "TensorProduct", "max_angular": 1,
                  "radial": {"type": "Gto", "max_radial": 1, "radius": 3.0}},
    })
    assert torch.get_default_dtype() == default


def test_fit_recovers_a_known_matrix_and_refuses_degenerate_data(float64_default):
    ir = o3.Irrep(3, -1)
    D = ir.D_from_matrix(-o3.rand_matrix(dtype=torch.float64))
    X = torch.randn(40, ir.dim, dtype=torch.float64)
    torch.testing.assert_close(_fit(X, X @ D.T, ir), D, rtol=0, atol=1e-13)
    # only 3 independent directions out of 7
    flat = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, ir.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="span fewer than its 7 components"):
        _fit(flat, flat @ D.T, ir)


def _write_molecule(path):
    ase = pytest.importorskip("ase")
    atoms = ase.Atoms(
        "OHHCH4",
        positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [3.0, 0.2, 0.1],
                   [3.63, 0.83, 0.73], [2.37, -0.43, 0.73], [2.37, 0.83, -0.53],
                   [3.63, -0.43, -0.53]],
    )
    atoms.write(str(path))


def test_cli_with_a_molecule_file_and_hypers(tmp_path, capsys):
    structure = tmp_path / "molecule.xyz"
    _write_molecule(structure)
    hypers = {
        "cutoff": {"radius": 5.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        "density": {"type": "Gaussian", "width": 0.3},
        "basis": {"type": "TensorProduct", "max_angular": 2,
                  "radial": {"type": "Gto", "max_radial": 3}},
    }
    code = main([str(structure), "--calculator", "spherical-expansion",
                 "--hypers", json.dumps(hypers), "--rotations", "1", "--output", ""])
    assert code == 0
    table = capsys.readouterr().out.splitlines()
    lines = [line.split() for line in table[1:] if line.split()[:1] in (["featomic"], ["e3nn"])]
    assert {line[1] for line in lines} == {"0e", "1o", "2e"}
    assert len(lines) == 2 * 3 * 2


def test_lode_of_a_molecule_is_a_clear_error(tmp_path):
    structure = tmp_path / "molecule.xyz"
    _write_molecule(structure)
    with pytest.raises(ValueError, match="LODE needs a periodic structure"):
        check_conventions(structure)


def test_cli_writes_the_picture(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    output = tmp_path / "conventions.png"
    result = subprocess.run(
        [sys.executable, "-m", "rascaline_e3nn.check", "--rotations", "1", "--output", str(output)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stdout
    assert "e3nn      2e     proper" in result.stdout
    image = pytest.importorskip("matplotlib.image").imread(str(output))
    assert image.shape[0] > 1000 and image.shape[1] > 1000  # five rows of three panels


def test_planar_molecule_is_a_clear_error(tmp_path):
    ase = pytest.importorskip("ase")
    structure = tmp_path / "water.xyz"
    ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]).write(str(structure))
    # its l = 1 features all lie in the molecule's plane
    with pytest.raises(ValueError, match="irrep 1o span fewer than its 3 components"):
        check_conventions(structure, calculator="spherical-expansion")
