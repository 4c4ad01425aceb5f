"""The README's quickstart runs as written (with a small real structure as input)."""

import pathlib
import re

import torch

from _systems import water_sodium

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_quickstart_runs():
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {"systems": [water_sodium()]}
    exec(compile(code, str(README), "exec"), namespace)
    y, prediction = namespace["y"], namespace["prediction"]
    assert y.shape == (7, 4) and y.dtype == torch.float64
    assert prediction.keys.values.tolist() == [[0, 1], [1, 1]]
    # the l=1 block holds y's vector part, back in featomic's (y, z, x) order
    assert torch.equal(prediction.block({"o3_lambda": 1}).values[:, :, 0], y[:, [2, 3, 1]])
