"""The documentation under docs/ says what the software does: its code runs, its
copies of the README's code are the README's (which tests/test_readme.py and
tests/test_cuequivariance.py run), and every gallery page names a script, a command
and a test that exist; the examples without a test of their own run here in tiny
configurations."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()


def rst_code_blocks(path):
    """The python code blocks of an rst page, dedented."""
    text = path.read_text()
    blocks = []
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", text):
        blocks.append(textwrap.dedent(match.group(1)).strip() + "\n")
    return blocks


def readme_code_block(section):
    start = README.index(section)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1).strip() + "\n"


def test_quickstart_page_has_the_readme_quickstart():
    assert rst_code_blocks(DOCS / "quickstart.rst")[0] == readme_code_block("## Quickstart")


def test_cuequivariance_snippet_is_the_readme_one():
    blocks = rst_code_blocks(DOCS / "guide" / "libraries.rst")
    assert blocks[0] == readme_code_block("## Which layout for which library")


def test_scripted_model_of_the_quickstart_page(tmp_path, monkeypatch):
    """The page's typed model scripts, saves, reloads and gives the eager model's
    prediction; the eager nn.Sequential of the same page does not script."""
    first, scripted_code = rst_code_blocks(DOCS / "quickstart.rst")[:2]
    # TorchScript reads the source of the Model class: the page's code as a module
    source = tmp_path / "docs_quickstart.py"
    source.write_text(
        "from _systems import water_sodium\nsystems = [water_sodium()]\n" + first + scripted_code
    )
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("docs_quickstart", source)
    page = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "docs_quickstart", page)
    spec.loader.exec_module(page)

    eager = page.Model(page.calculator, page.to_irreps).double()
    state = page.scripted.state_dict()
    eager.load_state_dict({name: state[name] for name in eager.state_dict()})
    expected = eager(page.systems)
    loaded = torch.jit.load("model.pt")
    for actual in (page.prediction, loaded(page.systems)):
        assert actual.keys == expected.keys
        for key, block in expected.items():
            torch.testing.assert_close(actual.block(key).values, block.values, rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError):
        torch.jit.script(page.model)


GALLERY = sorted((DOCS / "gallery").glob("*.rst"))
PAGES = [page for page in GALLERY if page.name != "index.rst"]


def test_gallery_index_globs_every_page():
    index = (DOCS / "gallery" / "index.rst").read_text()
    assert ":glob:" in index and re.search(r"^\s+\*\s*$", index, re.M)
    assert len(PAGES) >= 3


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_gallery_page_names_what_exists(page):
    text = page.read_text()
    for heading in ("What it shows", "Run it"):
        assert re.search(rf"^{heading}\n[-=~^]+$", text, re.M), f"{page.name} lacks '{heading}'"
    included = re.findall(r"\.\. literalinclude:: (\S+)", text)
    assert included, f"{page.name} includes no script"
    for name in included:
        assert (page.parent / name).resolve().is_file(), name
    commands = re.findall(r"python (examples/\S+\.py)", text)
    assert commands, f"{page.name} gives no command"
    for script in commands:
        assert (ROOT / script).is_file(), script
    tests = set(re.findall(r"tests/(test_\w+\.py)", text))
    assert tests, f"{page.name} names no test"
    for name in tests:
        assert (ROOT / "tests" / name).is_file(), name


def run(args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart_example_tiny_run(tmp_path):
    out = run([str(ROOT / "examples" / "quickstart.py"), "--max-angular", "2",
               "--max-radial", "1"], tmp_path)
    assert "irreps_out = 6x0e+6x1o+6x2e" in out
    assert out.count("equivariance under a") == 2
    assert "prediction back as a TensorMap" in out


def test_export_untrained_then_md_in_ase_tiny_run(tmp_path):
    """The gallery's metatomic commands: export_metatomic.py --untrained, then
    md_ase.py on the file, for a few steps."""
    out = run([str(ROOT / "examples" / "export_metatomic.py"), "--untrained",
               "--output", "lode-e3nn.pt", "--extensions", "extensions"], tmp_path)
    assert "saved lode-e3nn.pt" in out
    out = run([str(ROOT / "examples" / "md_ase.py"), "lode-e3nn.pt", "--steps", "3",
               "--extensions", "extensions"], tmp_path)
    assert "NVE: Cl4Na4, 8 atoms, 3 steps" in out and "total energy per atom: drift" in out
    assert "NPT: Cl4Na4, 8 atoms, 3 steps" in out and "volume: 179.406 ->" in out
    assert "nan" not in out.lower()
