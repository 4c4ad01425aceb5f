"""The README's quickstart runs as written (with a small real structure as input),
and its links lead to files of the repository."""

import pathlib
import re

import torch

from _systems import water_sodium

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"


def test_readme_quickstart_runs():
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {"systems": [water_sodium()]}
    exec(compile(code, str(README), "exec"), namespace)
    y, prediction = namespace["y"], namespace["prediction"]
    # the comment of the quickstart says what irreps_out is
    assert str(namespace["to_irreps"].irreps_out) == "12x0e+12x1o+12x2e+12x3o+12x4e"
    assert "to_irreps.irreps_out          # 12x0e+12x1o+12x2e+12x3o+12x4e" in code
    assert y.shape == (7, 4) and y.dtype == torch.float64
    assert prediction.keys.values.tolist() == [[0, 1], [1, 1]]
    # the l=1 block holds y's vector part, back in featomic's (y, z, x) order
    assert torch.equal(prediction.block({"o3_lambda": 1}).values[:, :, 0], y[:, [2, 3, 1]])


def test_readme_set_up_commands():
    text = README.read_text()
    assert 'pip install torch==2.13.0 -e ".[examples]" && python examples/train_long_range.py' in text
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -m "not fuzz"' in text
    # .ci/run runs exactly the README's test command
    assert '\npython -m pytest -m "not fuzz"\n' in (ROOT / ".ci" / "run").read_text()


def test_readme_links_lead_to_files():
    links = re.findall(r"\]\(((?!https?://|#)[^)]+)\)", README.read_text())
    assert links
    for link in links:
        assert (ROOT / link).exists(), link


def test_readme_lode_section_runs():
    text = README.read_text()
    code = re.search(r"## LODE in PyTorch\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {"systems": [water_sodium()]}
    exec(compile(code, str(README), "exec"), namespace)
    x, descriptor = namespace["x"], namespace["descriptor"]
    assert x.shape == (7, 12 * 25) and x.dtype == torch.float64
    assert str(namespace["calculator"].to_irreps([1, 8, 11]).irreps_out).startswith("12x0e+")
    assert len(descriptor.keys) > 0
