"""``examples/vesin_convolution.py``: LODE node features and vesin edges in an e3nn
convolution, run in a tiny configuration; its scripted model reloads in a fresh
process that imports neither the examples nor this package."""

import os
import subprocess
import sys

import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)

import vesin_convolution  # noqa: E402

TINY = ["--max-angular", "1", "--max-radial", "1", "--mul", "2", "--rotations", "1",
        "--quiet"]


def test_tiny_run_is_equivariant_and_scripts(tmp_path):
    result = vesin_convolution.main(TINY + ["--plot", str(tmp_path / "errors.png")])
    assert (tmp_path / "errors.png").stat().st_size > 0
    for kind in ("proper", "improper"):
        errors = result["errors"][kind]
        assert errors["energy"] < 1e-10 and errors["forces"] < 1e-10
        assert errors["per_atom"] < 1e-10
    # the check can fail: ignoring the outputs' parity is seen by improper rotations
    assert result["errors"]["improper"]["per_atom_parity_ignored"] > 1e-3
    assert result["script_error"] < 1e-12 and result["n_edges"] > 0


def test_scripted_model_loads_without_the_examples(tmp_path, float64_default):
    from e3nn.util.jit import compile as e3nn_compile

    systems = vesin_convolution.structures()
    model = vesin_convolution.ConvolutionModel([1, 8, 11, 17], max_angular=1,
                                               max_radial=1, mul=2)
    expected = model.energies(systems).detach()
    path = str(tmp_path / "model.pt")
    torch.jit.script(e3nn_compile(model)).save(path)
    torch.save([{"types": s.types, "positions": s.positions, "cell": s.cell}
                for s in systems], tmp_path / "systems.pt")
    script = """
import sys
import torch
import featomic.torch, vesin_torch  # TorchScript classes of the calculator and vesin
from metatomic.torch import System
model = torch.jit.load(sys.argv[1])
systems = [System(types=d["types"], positions=d["positions"], cell=d["cell"],
                  pbc=torch.tensor([True, True, True])) for d in torch.load(sys.argv[2])]
for name in ("common", "vesin_convolution", "rascaline_e3nn", "e3nn"):
    assert name not in sys.modules, name
print(repr(model.energies(systems).tolist()))
"""
    env = dict(os.environ, PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script, path,
                             str(tmp_path / "systems.pt")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.tensor(eval(result.stdout), dtype=torch.float64)
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-12)
