"""The library is what `pip install vcon_jax` gives: no experiment tooling imported."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_import_vcon_jax_pulls_no_experiment_tooling():
  code = ("import sys, vcon_jax; heavy = [m for m in ('tensorflow_datasets', 'matplotlib', "
          "'tensorboardX', 'tqdm', 'array_record', 'vcon_experiments', 'tensorflow') "
          "if m in sys.modules]; print(heavy)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=300).stdout.strip()
  assert out == "[]", out


def test_core_dependencies_are_the_lean_set():
  import pathlib  # pylint: disable=import-outside-toplevel
  import tomllib  # pylint: disable=import-outside-toplevel
  meta = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
  names = {d.split(">")[0].split("=")[0].split("<")[0].strip()
           for d in meta["project"]["dependencies"]}
  assert names == {"jax", "flax", "optax", "orbax-checkpoint", "numpy"}
