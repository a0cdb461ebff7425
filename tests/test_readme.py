"""The README's quick start runs as written and produces the compressed model."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
  code = re.search(r"## Quick start\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
  assert len(code.strip().splitlines()) <= 20
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert float(scope["metrics"]["beta"]) == 0.0
  kernel = np.asarray(scope["cparams"]["Dense_0"]["kernel"])
  assert abs((kernel != 0).mean() - 0.1) < 1e-3
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
