#!/usr/bin/env bash
# The tests, as CI runs them: the whole suite on the default Python (3.11: JAX 0.10), then
# the fast tier on Python 3.12, where pip resolves the newest JAX (0.12). Sets up both
# environments first (scripts/setup.sh) and lints with ruff ([tool.ruff] in pyproject.toml).
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -c "import jax; print(f'[test] whole suite on Python 3.11 / JAX {jax.__version__}')"
.venv/bin/python -m pytest -n 2 -q

# The documentation site (docs/), warnings as errors: the docs extra goes into .venv (once,
# and again when pyproject.toml changes). Here, not at the very end: the Python 3.12 part
# below may exit early.
if ! .venv/bin/python -c "import sphinx, myst_parser, sphinx_book_theme" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.docs-installed ]; then
  .venv/bin/python -m pip install -q -e ".[docs]"
  touch .venv/.docs-installed
fi
docs_start=$SECONDS
.venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
echo "[test] docs built with warnings as errors in $((SECONDS - docs_start)) s: docs/_build/html"

py312=$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$py312" ]; then
  py312=$(command -v python3.12 || true)
fi
if [ -z "$py312" ]; then
  echo "[test] SKIPPED: the fast tier on the newest JAX needs Python 3.12 (none at ~/.pyenv/versions/3.12* or on PATH)"
  exit 0
fi
PYTHON="$py312" VENV=.venv312 bash scripts/setup.sh
.venv312/bin/python -c "import jax; print(f'[test] fast tier on Python 3.12 / JAX {jax.__version__}')"
.venv312/bin/python -m pytest -m "not slow" -n 2 -q
