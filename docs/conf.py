"""Sphinx configuration of the vcon_jax documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (what
``scripts/test.sh`` runs; ``pip install -e ".[docs]"`` first).
"""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "vcon_jax"
author = "vcon_jax authors"
copyright = "2026, vcon_jax authors"  # pylint: disable=redefined-builtin

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# sphinx-book-theme where it installs (the docs extra), else furo, else Sphinx's own.
for _theme in ("sphinx_book_theme", "furo"):
  if importlib.util.find_spec(_theme):
    html_theme = _theme
    break
else:
  html_theme = "alabaster"
html_title = "vcon_jax"
