#!/usr/bin/env bash
# Installs the Debian packages whose files vcon_experiments.data builds datasets from:
#   dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist/*.gz (Fashion-MNIST IDX)
#   wordnet-base           -> /usr/share/wordnet/data.* (WordNet 3.0 database)
# Idempotent: does nothing when both are installed. Uses sudo only if not root.
set -euo pipefail

PACKAGES=(dataset-fashion-mnist wordnet-base)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "System packages already installed: ${PACKAGES[*]}"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: apt-get not found; install ${missing[*]} (Debian/Ubuntu packages) by hand," >&2
  echo "or pass source_dir=... to vcon_experiments.data.load with the raw files." >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "error: not root and sudo not found; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

echo "Installing: ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
