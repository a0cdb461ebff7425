"""Compact export of a compressed model, loading it back to run, and a size summary.

:func:`export` writes the compressed model (``beta = 0``: exactly the values of
``step.compressed_params(state)``) as one ``.npz`` file whose arrays are the compact
encodings and whose ``__manifest__`` entry is a JSON description of every leaf.

Modules, one job each:

* :mod:`~vcon_jax.export.codec`: bit packing and decoding (numpy only);
* :mod:`~vcon_jax.export.encoder`: the exact-fit search for each leaf's smallest encoding;
* :mod:`~vcon_jax.export.format`: the file, its manifest and version;
* :mod:`~vcon_jax.export.writer`: :func:`export`;
* :mod:`~vcon_jax.export.runtime`: :class:`CompressedModel` and :func:`load_compressed`;
* :mod:`~vcon_jax.export.layers`: layers run from their compact form at their matmul
  (low-rank as two thin matmuls; ``decode="native"`` k-bit, binary and sparse);
* :mod:`~vcon_jax.export.qwix_interop`: an export as a qwix PTQ model's params
  (:func:`to_qwix`);
* :mod:`~vcon_jax.export.table`: the size table (:func:`summary`).
"""

from vcon_jax.export.qwix_interop import to_qwix
from vcon_jax.export.runtime import CompressedModel, auto_decode, load_compressed
from vcon_jax.export.table import Summary, summary
from vcon_jax.export.writer import export

__all__ = ["CompressedModel", "Summary", "auto_decode", "export", "load_compressed",
           "summary", "to_qwix"]
