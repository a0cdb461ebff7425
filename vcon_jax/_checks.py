"""Argument checks of the train step, run in Python before anything is traced.

Each check is a pure function that returns nothing or raises a one-line ``ValueError`` /
``TypeError`` saying what was passed and what to pass instead. Mistakes that would
otherwise fail deep inside optax or Flax (or, worse, give a silent ``nan``) fail here.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# The fix for a Linen model given its params without the other collections.
_PASS_VARIABLES = "pass step.init(variables) with the whole dict model.init(...) returns"

# Second-argument names that say a loss_fn expects labels, where the step passes the batch.
_LABEL_NAMES = ("labels", "label", "targets", "target", "y", "y_true")


def check_loss_fn(loss_fn: Callable) -> None:
  """``loss_fn`` must take ``(logits, batch)``."""
  try:
    inspect.signature(loss_fn).bind(None, None)
  except TypeError:
    raise TypeError(f"loss_fn{inspect.signature(loss_fn)} cannot be called as "
                    f"loss_fn(logits, batch); the step calls it with the logits and the "
                    f"whole batch dict.") from None
  except ValueError:  # builtins without a signature: checked when first called
    pass


def loss_fn_error(loss_fn: Callable, err: Exception, batch_keys: list) -> ValueError:
  """The error for a ``loss_fn`` that failed on ``(logits, batch)`` (e.g. wants labels)."""
  try:
    second = list(inspect.signature(loss_fn).parameters)[1]
  except (TypeError, ValueError, IndexError):
    second = None
  hint = (f" Its second argument is named {second!r}, but it receives the batch dict;"
          if second in _LABEL_NAMES else "")
  return ValueError(
      f"loss_fn(logits, batch) failed with {type(err).__name__}: {err}.{hint} The step "
      f"calls loss_fn(logits, batch) with the batch dict (keys {batch_keys}) and expects "
      f"a scalar loss or (loss, metrics), e.g. loss_fn=lambda logits, batch: "
      f"optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels']).mean().")


def check_loss_output(out: Any) -> None:
  """The (abstract) value of ``loss_fn`` must be a scalar or ``(scalar, dict)``."""
  loss, extra = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
  if np.shape(loss) != () or not isinstance(extra, Mapping):
    raise ValueError(f"loss_fn must return a scalar loss or (loss, metrics dict), got "
                     f"{jax.tree.map(lambda x: getattr(x, 'shape', x), out)}.")


def check_state(state: Any, state_type: type) -> None:
  """``step(state, batch)`` needs the state ``step.init`` returned."""
  if isinstance(state, state_type) and state.rng is not None:
    return
  if isinstance(state, state_type):
    raise TypeError("step(state, batch) got the state of a vj.wrap_optax optimiser (it has "
                    "no model state or rng); pass the state returned by step.init(...).")
  got = "None" if state is None else f"a {type(state).__name__}"
  what = " (the model's params?)" if isinstance(state, Mapping) or hasattr(
      state, "to_pure_dict") else ""
  raise TypeError(f"step(state, batch) got {got}{what} as state; pass the state returned "
                  f"by step.init(...): state = step.init(params); state, metrics = "
                  f"step(state, batch).")


def check_not_replicated(state: Any) -> None:
  """Views of the state take one copy, not the stacked copies of a ``jax.pmap`` loop."""
  ndim = np.ndim(state.step)
  if ndim:
    raise ValueError(f"state has a leading device axis of size {np.shape(state.step)[0]} "
                     f"(a jax.pmap state); pass vj.unreplicate(state).")


def check_labels(labels: Any, logits_shape: tuple, label_key: str = "labels") -> None:
  """Labels of the default loss: integer class ids, one per logits row, in range.

  The range is checked only for concrete host arrays (numpy, lists): a device array would
  have to be copied back. On device the default loss gives ``nan`` for a label out of
  range and the step reports ``metrics['invalid_labels']``.
  """
  # Only shape and dtype of a device array: fetching it would block every step, and a
  # global array spanning other processes' devices cannot be fetched at all.
  dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
  shape = np.shape(labels)
  want = tuple(logits_shape[:-1])
  classes = logits_shape[-1] if logits_shape else None
  if shape == tuple(logits_shape) and classes != 1:
    raise ValueError(f"batch[{label_key!r}] has the logits' shape {shape}: one-hot or soft "
                     f"labels; the default loss takes integer class ids of shape {want} "
                     f"(pass labels.argmax(-1)), or pass loss_fn=lambda logits, batch: "
                     f"optax.softmax_cross_entropy(logits, batch[{label_key!r}]).mean().")
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(f"batch[{label_key!r}] has dtype {dtype}; the default loss takes "
                     f"integer class ids (pass labels.astype(np.int32), or a loss_fn for "
                     f"other targets).")
  if shape != want:
    fix = " (pass labels.reshape(-1))" if shape == want + (1,) else ""
    raise ValueError(f"batch[{label_key!r}] has shape {shape}; for logits of shape "
                     f"{tuple(logits_shape)} the default loss needs one class id per row, "
                     f"shape {want}{fix}.")
  if isinstance(labels, (np.ndarray, np.generic, list, tuple)) and np.size(labels):
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0 or high >= classes:
      raise ValueError(f"batch[{label_key!r}] holds class ids in [{low}, {high}], but the "
                       f"model gives {classes} logits: labels must lie in [0, {classes}).")


def check_linen_variables(variables: Mapping) -> None:
  """A Linen model with BatchNorm needs its ``batch_stats`` (``model.init``'s output).

  Recognised here by Linen's own names (``BatchNorm_0``); a renamed BatchNorm is caught
  by :func:`preflight` before the first step instead.
  """
  if "params" in variables:
    return
  norms = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
    names = [str(getattr(k, "key", k)) for k in path]
    hits = [i for i, n in enumerate(names) if re.fullmatch(r"BatchNorm(_\d+)?", n)]
    if hits:
      norms.add("/".join(names[:hits[0] + 1]))
  norms = sorted(norms)
  if norms:
    raise ValueError(f"init got the params alone, but the model has BatchNorm layers "
                     f"({', '.join(norms[:3])}) whose statistics live in 'batch_stats': "
                     f"{_PASS_VARIABLES}.")


def missing_collection_error(err: Exception) -> ValueError:
  """The error for a Linen model applied without a collection it needs."""
  return ValueError(f"the model needs a variable collection the state lacks ({err}); "
                    f"{_PASS_VARIABLES} (e.g. 'params' and 'batch_stats'), not "
                    f"variables['params'].")


def check_nnx_params(pure: Any, template: Any) -> None:
  """An NNX step takes the module's own ``nnx.Param`` state (or ``None``)."""
  if jax.tree.structure(pure) == jax.tree.structure(template):
    return
  keys = sorted(pure) if isinstance(pure, Mapping) else type(pure).__name__
  hint = (" (Linen variables? an NNX step takes the module's own params)"
          if isinstance(pure, Mapping) and ("params" in pure or "batch_stats" in pure)
          else "")
  raise ValueError(f"init got params with keys {keys}{hint} that do not match the NNX "
                   f"module's nnx.Param state (keys {sorted(template)}); pass step.init() "
                   f"or step.init(nnx.state(module, nnx.Param)).")


def unbound_axis_error(axis_name: str) -> ValueError:
  return ValueError(f"this step was built with axis_name={axis_name!r} for jax.pmap; wrap "
                    f"it in jax.pmap(step, axis_name={axis_name!r}) and pass "
                    f"vj.replicate(state) and batches with a leading device axis (or build "
                    f"the step without axis_name to use the jit data-parallel step).")


def invalid_label_fraction(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """On device: the fraction of integer labels outside ``[0, num_classes)``."""
  return jnp.mean((labels < 0) | (labels >= logits.shape[-1]))


def preflight(step: Any, state: Any, batch: Mapping, *, training: bool) -> None:
  """Checks ``step``'s model, labels and loss on ``batch`` abstractly, before jit.

  The model's output shape is found with ``jax.eval_shape`` once per batch shape; the
  range of host labels is checked on every call. ``loss_fn`` is checked where it will be
  called: in training, and in evaluation when the batch has labels.
  """
  cache = step.__dict__.setdefault("_preflight_shapes", {})
  leaves, treedef = jax.tree.flatten(dict(batch))
  key = (training, treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
  labels = batch.get(step.label_key)
  if key not in cache:
    apply = lambda p, ms, x: step.adapter.apply(p, ms, x, None, False)[0]
    try:
      logits = jax.eval_shape(apply, state.params, state.model_state,
                              batch[step.input_key])
    except Exception as err:  # pylint: disable=broad-except
      if type(err).__name__ == "ScopeCollectionNotFound":
        raise missing_collection_error(err) from None
      raise
    # the output is whatever the model returns (an array, a dict, a dataclass): only the
    # default loss needs it to be the logits array
    shape = getattr(logits, "shape", None)
    if step.needs_labels and shape is None:
      raise ValueError(f"the model returns {type(logits).__name__!r}, not a logits array, "
                       f"so the default loss cannot use it; pass loss_fn=lambda outputs, "
                       f"batch: ... (e.g. softmax cross-entropy of outputs.logits).")
    if step.needs_labels and labels is not None:
      check_labels(labels, shape, step.label_key)
    if training or labels is not None:
      try:
        loss_fn = getattr(step.loss_fn, "loss_fn", step.loss_fn)  # distillation: its task loss
        out = jax.eval_shape(loss_fn, logits, dict(batch))
      except Exception as err:  # pylint: disable=broad-except
        raise loss_fn_error(step.loss_fn, err, sorted(batch)) from None
      check_loss_output(out)
    cache[key] = shape
  elif step.needs_labels and labels is not None:
    check_labels(labels, cache[key], step.label_key)
