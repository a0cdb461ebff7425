#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine: the data packages (apt) and a virtual
# environment with vcon_jax and its test dependencies. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
missing=()
for pkg in dataset-fashion-mnist wordnet-base; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[setup] installing Debian data packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# PYTHON picks the interpreter, VENV the environment's folder (default .venv): CI also
# builds .venv312 with Python 3.12, where pip resolves the newest JAX.
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vcon_jax, vcon_experiments, tensorflow_datasets, pytest, hypothesis, xdist, tunix" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$VENV/.installed" ]; then
  echo "[setup] installing vcon_jax and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[experiments,test]"
  touch "$VENV/.installed"
fi
