"""``python -m vcon_jax``: the ``vcon-jax`` command line."""

import sys

from vcon_jax.cli import main

sys.exit(main())
