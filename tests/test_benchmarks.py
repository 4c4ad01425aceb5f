"""benchmarks/bench_fixed_cost.py runs in its quick configuration (so that it keeps
working); no timing is asserted."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_bench_fixed_cost_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_fixed_cost.py"), "--quick"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "settings: threads 1" in out and "--quick" in out
    assert "fit time = a + b * n_blocks" in out
    for variant in ("to_irreps eager", "to_irreps scripted", "inverse eager",
                    "inverse scripted", "read attributes, Python",
                    "read attributes, TorchScript", "metadata step, TorchScript"):
        fitted = [line for line in out.splitlines() if line.startswith(variant + " ")]
        assert fitted, variant
