"""Writing a compact export: :func:`export`."""

from __future__ import annotations

import os
from typing import Any

from vcon_jax.export import encoder, format as fmt_lib, table


def export(step: Any, state: Any, path: str | os.PathLike | None = None, *,
           model: Any = None, model_state: Any = None) -> table.Summary:
  """Writes the compressed model (``beta = 0``) to ``path`` in compact form.

  Two ways in: ``export(step, state, path)`` for :func:`~vcon_jax.make_train_step`, or
  ``export(opt_state, path, model=model)`` for a :func:`~vcon_jax.wrap_optax` loop (its
  state is found inside ``optax.chain``, ``MultiSteps`` and ``nnx.Optimizer``), with
  ``model_state`` the Linen collections besides params (``{"batch_stats": ...}``) or an
  NNX module's non-param state (default: read from ``model``).

  The file is one ``.npz`` (written to a temporary file and moved into place, so a reader
  never sees a partial file); load it with :func:`~vcon_jax.load_compressed`. Pruned layers
  are stored as their non-zero values plus a bitmask, per-unit indices or n:m positions;
  binary layers as sign bits with their scale; k-bit layers as packed k-bit integers with
  per-channel scales; low-rank layers as their two factors. Every encoding is checked to
  decode to exactly ``step.compressed_params(state)`` (low-rank factors: to float
  tolerance). Unselected leaves and the model state (BatchNorm statistics, ...) are stored
  as they are.

  Args:
    step: the :class:`~vcon_jax.TrainStep` that trained ``state``, or a ``wrap_optax``
      ``opt_state``.
    state: the train state (or, after an ``opt_state``, the path).
    path: file to write (any name; ``.npz`` is conventional). Parent folders are created.
    model, model_state: with an ``opt_state`` only (see above).

  Returns:
    The :class:`~vcon_jax.Summary` of what was written (per-layer sizes from the actual
    encodings).

  >>> vj.export(step, state, "model.npz")                  # doctest: +SKIP
  >>> vj.export(opt_state, "model.npz", model=model)       # doctest: +SKIP
  """
  wrapped = not encoder.is_train_step(step)
  if wrapped:
    if path is not None:
      raise ValueError(f"export takes (step, state, path) with the TrainStep of "
                       f"vj.make_train_step, or (opt_state, path, model=...) for a "
                       f"vj.wrap_optax loop; got a {type(step).__name__} and three "
                       f"positional arguments.")
    path = state
  elif model is not None or model_state is not None:
    raise ValueError("model= and model_state= are for exporting a vj.wrap_optax opt_state; "
                     "a TrainStep's state holds both.")
  if path is None:
    raise ValueError("export needs a path to write, e.g. export(step, state, 'model.npz').")
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"export path {path!r} is a directory; pass a file name such as "
                     f"{os.path.join(path, 'model.npz')!r}.")
  manifest, arrays = (encoder.encode_wrapped(step, model, model_state) if wrapped
                      else encoder.encode_model(step, state))
  fmt_lib.write(path, manifest, arrays)
  return table.from_manifest(manifest, file_bytes=os.path.getsize(path))
