"""The documentation's code runs: every ```python block of every guide, page by page.

Each page's blocks run in order in one fresh namespace, in a temporary working directory
(pages write ``model.npz`` and checkpoints). A block preceded by a ``<!-- skip -->`` line
is not run (it needs a data set or hours); those stay few. Pages that train for several
seconds are marked ``slow``.
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

#: Pages whose code takes more than a few seconds on the 2-core CPU.
SLOW_PAGES = {"structured_pruning.md", "qwix.md", "scaling.md", "checkpoints.md"}

#: Textual changes a page needs to run under the test suite's forced CPU devices, with why.
PATCHES = {
    # Queued pmap steps on forced CPU devices can deadlock XLA:CPU's collectives (see
    # conftest.py); on a GPU or TPU the loop runs as written.
    "scaling.md": [("p_step(state, batch)", "jax.block_until_ready(p_step(state, batch))")],
}

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_SKIP = "<!-- skip -->"


def code_blocks(page: pathlib.Path) -> list[tuple[int, str, bool]]:
  """``(line, code, skipped)`` of each top-level ```python block of ``page``."""
  text = page.read_text()
  blocks = []
  for m in _FENCE.finditer(text):
    line = text.count("\n", 0, m.start()) + 1
    before = [ln for ln in text[:m.start()].splitlines() if ln.strip()]
    blocks.append((line, m.group(1), bool(before) and before[-1].strip() == _SKIP))
  return blocks


def _pages():
  return [DOCS / "getting_started.md"] + sorted((DOCS / "guides").glob("*.md"))


def _params():
  return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else [])
          for p in _pages()]


@pytest.mark.parametrize("page", _params())
def test_page_code_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  scope = {"__name__": "__docs__"}
  ran = 0
  for line, code, skipped in code_blocks(page):
    if skipped:
      continue
    for old, new in PATCHES.get(page.name, []):
      code = code.replace(old, new)
    # Leading newlines keep the page's line numbers in a traceback.
    exec(compile("\n" * line + code, str(page), "exec"), scope)  # pylint: disable=exec-used
    ran += 1
  assert ran, f"{page.name} has no runnable code"


def test_pages_are_found_and_skips_stay_few():
  names = {p.name for p in _pages()}
  assert SLOW_PAGES <= names and set(PATCHES) <= names
  skipped = [(p.name, line) for p in _pages() for line, _, s in code_blocks(p) if s]
  assert len(skipped) <= 3, skipped
  for old, _ in (x for v in PATCHES.values() for x in v):
    assert any(old in code for p in _pages() for _, code, _ in code_blocks(p)), old


def test_api_page_lists_every_public_name():
  import vcon_jax  # pylint: disable=import-outside-toplevel
  from vcon_jax import ops  # pylint: disable=import-outside-toplevel
  api = (DOCS / "api.md").read_text()
  documented = set(re.findall(r"^\.\. auto\w+:: (vcon_jax\.[\w.]+)", api, re.M))
  documented |= set(re.findall(r"^\.\. py:data:: (vcon_jax\.[\w.]+)", api, re.M))
  public = {f"vcon_jax.{n}" for n in vcon_jax.__all__ if n != "ops"}
  public |= {f"vcon_jax.ops.{n}" for n in ops.__all__}
  assert not public - documented, sorted(public - documented)
