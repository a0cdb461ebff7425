"""``python -m vcon_experiments``: the ``vcon-jax`` command line."""

import sys

from vcon_experiments.cli import main

sys.exit(main())
