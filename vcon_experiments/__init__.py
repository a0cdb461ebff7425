"""vcon_experiments: the experiment suite of vcon_jax (data, models, runs, reports, CLI).

Installed with ``pip install vcon_jax[experiments]``; the library ``vcon_jax`` never imports it.
"""
