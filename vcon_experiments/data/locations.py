"""Default locations for source files and prepared TFDS data."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable overriding where prepared datasets are written.
DATA_DIR_ENV = "VCON_JAX_DATA_DIR"

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Where the Debian package ``wordnet-base`` installs the WordNet 3.0 database.
WORDNET_SOURCE_DIR = Path("/usr/share/wordnet")


def default_data_dir() -> Path:
  """Returns the directory prepared local datasets are written to.

  ``$VCON_JAX_DATA_DIR`` if set, otherwise ``~/.cache/vcon_jax/tfds``.
  """
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return Path(env).expanduser()
  return Path("~/.cache/vcon_jax/tfds").expanduser()
