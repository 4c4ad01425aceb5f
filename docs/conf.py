"""Sphinx configuration of the rascaline-e3nn documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` from the
repository root (``pip install -e ".[docs]"``).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# document the package of this source tree, whatever is installed
sys.path.insert(0, str(ROOT))

import rascaline_e3nn  # noqa: E402

project = "rascaline-e3nn"
author = "the rascaline-e3nn developers"
copyright = "the rascaline-e3nn developers"
release = rascaline_e3nn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]

# the API reference documents the members each page names, in the order of the source
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"rascaline-e3nn {release}"
