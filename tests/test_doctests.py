"""Docstring examples of the library modules run as tests (``doctest``).

The experiment suite lives in ``vcon_experiments``, beside the library, and is not
collected here.
"""

import doctest
import importlib
import pkgutil

import numpy as np
import pytest

import vcon_jax

_NOT_LIBRARY = ("vcon_experiments",)


def _library_modules() -> list[str]:
  names = ["vcon_jax"]
  for info in pkgutil.walk_packages(vcon_jax.__path__, "vcon_jax."):
    if not info.name.startswith(_NOT_LIBRARY):
      names.append(info.name)
  return sorted(names)


MODULES = _library_modules()


def test_the_library_modules_are_found():
  assert {"vcon_jax._transform", "vcon_jax.export.codec", "vcon_jax._spec"} <= set(MODULES)
  assert not [m for m in MODULES if m.startswith(_NOT_LIBRARY)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  module = importlib.import_module(name)
  result = doctest.testmod(module, extraglobs={"np": np, "vj": vcon_jax},
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           report=True, verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
