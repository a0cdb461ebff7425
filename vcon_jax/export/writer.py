"""Writing a compact export: :func:`export`."""

from __future__ import annotations

import os
from typing import Any

from vcon_jax.export import encoder, format as fmt_lib, table


def export(state: Any, path: Any = None, *deprecated: Any, model: Any = None,
           model_state: Any = None) -> table.Summary:
  """Writes the compressed model (``beta = 0``) to ``path`` in compact form.

  One signature for both ways of training: ``export(state, path, model=model)``, where
  ``state`` is the :class:`~vcon_jax.TrainState` of :func:`~vcon_jax.make_train_step` or
  the ``opt_state`` of a :func:`~vcon_jax.wrap_optax` loop (found inside ``optax.chain``,
  ``MultiSteps`` and ``nnx.Optimizer``), and ``model`` the Linen or NNX module. The
  model state (BatchNorm statistics) is the train state's; for an ``opt_state``,
  ``model_state`` gives the Linen collections besides params (``{"batch_stats": ...}``)
  or an NNX module's non-param state (default: read from ``model``). The 0.3 spelling
  ``export(step, state, path)`` works for one release with a ``DeprecationWarning``.

  The file is one ``.npz`` (written to a temporary file and moved into place, so a reader
  never sees a partial file); load it with :func:`~vcon_jax.load_compressed`. Pruned layers
  are stored as their non-zero values plus a bitmask, per-unit indices or n:m positions;
  binary layers as sign bits with their scale; k-bit layers as packed k-bit integers with
  per-channel scales; low-rank layers as their two factors. Every encoding is checked to
  decode to exactly the compressed values (the core's compiled view, which
  ``step.compressed_params`` and ``vj.compressed_params`` return too; low-rank factors: to
  float tolerance). Unselected leaves and the model state are stored as they are.

  Args:
    state: a train state or a ``wrap_optax`` ``opt_state``.
    path: file to write (any name; ``.npz`` is conventional). Parent folders are created.
    model: the Linen or NNX module the params belong to.
    model_state: with an ``opt_state`` only (see above).

  Returns:
    The :class:`~vcon_jax.Summary` of what was written (per-layer sizes from the actual
    encodings).

  >>> vj.export(state, "model.npz", model=model)           # doctest: +SKIP
  >>> vj.export(opt_state, "model.npz", model=model)       # doctest: +SKIP
  """
  state, path, model = encoder.legacy_step_call("export", state, (path, *deprecated), model)
  if path is None:
    raise ValueError("export needs a path to write, e.g. export(state, 'model.npz', "
                     "model=model).")
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"export path {path!r} is a directory; pass a file name such as "
                     f"{os.path.join(path, 'model.npz')!r}.")
  manifest, arrays = encoder.encode_state(state, model, model_state)
  fmt_lib.write(path, manifest, arrays)
  return table.from_manifest(manifest, file_bytes=os.path.getsize(path))
