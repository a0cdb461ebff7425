"""Runs the README quick start (the main job until the experiment CLI lands)."""

import pathlib
import re

readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
code = re.search(r"## Quick start\s+```python\n(.*?)```", readme.read_text(), re.S).group(1)
exec(compile(code, "README.md", "exec"))  # pylint: disable=exec-used
print({k: round(float(v), 4) for k, v in metrics.items()})  # noqa: F821
