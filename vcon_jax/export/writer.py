"""Writing a compact export: :func:`export`."""

from __future__ import annotations

import os
from typing import Any

from vcon_jax.export import encoder, format as fmt_lib, table


def export(step: Any, state: Any, path: str | os.PathLike) -> table.Summary:
  """Writes the compressed model (``beta = 0``) of ``state`` to ``path`` in compact form.

  The file is one ``.npz`` (written to a temporary file and moved into place, so a reader
  never sees a partial file); load it with :func:`~vcon_jax.load_compressed`. Pruned layers
  are stored as their non-zero values plus a bitmask, per-unit indices or n:m positions;
  binary layers as sign bits with their scale; k-bit layers as packed k-bit integers with
  per-channel scales; low-rank layers as their two factors. Every encoding is checked to
  decode to exactly ``step.compressed_params(state)`` (low-rank factors: to float
  tolerance). Unselected leaves and the model state (BatchNorm statistics, ...) are stored
  as they are.

  Args:
    step: the :class:`~vcon_jax.TrainStep` that trained ``state``.
    state: the train state.
    path: file to write (any name; ``.npz`` is conventional). Parent folders are created.

  Returns:
    The :class:`~vcon_jax.Summary` of what was written (per-layer sizes from the actual
    encodings).

  >>> vj.export(step, state, "model.npz")                  # doctest: +SKIP
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"export path {path!r} is a directory; pass a file name such as "
                     f"{os.path.join(path, 'model.npz')!r}.")
  manifest, arrays = encoder.encode_model(step, state)
  fmt_lib.write(path, manifest, arrays)
  return table.from_manifest(manifest, file_bytes=os.path.getsize(path))
