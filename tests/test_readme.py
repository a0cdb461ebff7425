"""The README's quick start runs as written and produces the compressed model."""

import pathlib
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the README's examples train end to end

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
  code = re.search(r"## Quick start\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
  assert len(code.strip().splitlines()) <= 20
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert float(scope["metrics"]["beta"]) == 0.0
  # Linen names the head Dense_0 (built first): the output layer, dense with the trace
  hidden, head = (np.asarray(scope["cparams"][n]["kernel"]) for n in ("Dense_1", "Dense_0"))
  assert hidden.shape == (784, 256) and abs((hidden != 0).mean() - 0.1) < 1e-3
  assert head.shape == (256, 10) and (head != 0).all()
  assert scope["logits"].shape == (128, 10)


def test_readme_own_training_loop_runs():
  code = re.search(r"## Use it in your own training loop.*?```python\n(.*?)```",
                   README.read_text(), re.S).group(1)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert np.isfinite(float(scope["loss"]))
  kernel = np.asarray(scope["cparams"]["Dense_0"]["kernel"])
  assert abs((kernel != 0).mean() - 0.1) < 1e-3
  np.testing.assert_allclose(scope["params"]["Dense_0"]["kernel"], kernel, atol=1e-6)

def test_readme_pmap_recipe_runs():
  text = README.read_text()
  quick = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
  recipe = re.search(r"### Using jax.pmap\s.*?```python\n(.*?)```", text, re.S).group(1)
  scope = {}
  exec(compile(quick.replace("range(100)", "range(1)"), "README.md", "exec"), scope)  # pylint: disable=exec-used
  # Each step is waited for: queued pmap steps on forced CPU devices can deadlock XLA:CPU's
  # collectives (see conftest.py); on a GPU or TPU the recipe runs as written.
  recipe = recipe.replace("p_step(state, batch)", "jax.block_until_ready(p_step(state, batch))")
  assert "block_until_ready" in recipe
  exec(compile(recipe, "README.md", "exec"), scope)  # pylint: disable=exec-used
  import jax  # pylint: disable=import-outside-toplevel
  n = jax.local_device_count()
  assert scope["metrics"]["beta"].shape == (n,) and float(scope["metrics"]["beta"][0]) == 0.0
  kernel = np.asarray(scope["cparams"]["Dense_1"]["kernel"])  # Dense(256): built second
  assert kernel.shape == (784, 256)  # no leading device axis
  assert abs((kernel != 0).mean() - 0.1) < 1e-3
