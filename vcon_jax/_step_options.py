"""The small values :func:`vcon_jax.make_train_step` takes, one concept each.

``make_train_step`` has eight keyword options; three of them are values of their own
here: where the step runs (:class:`Parallel`), which batch entries it reads
(:class:`BatchKeys`) and what a Linen model's ``apply`` is given in training and in
evaluation (:class:`ModelKwargs`). Distillation is a loss (``loss_fn=vj.distill(...)``).
The 0.3 keywords these replace still work for one release (:func:`from_deprecated`).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from jax.sharding import Mesh

from vcon_jax._losses import distill
from vcon_jax._selection import caller_level


class Parallel(NamedTuple):
  """Where the step runs and what it does with the input state's buffers.

  Attributes:
    mesh: a device mesh with a ``'data'`` axis (``None``: all devices on ``'data'``); the
      step is one ``jax.jit`` over it, params keep the ``NamedSharding`` they were given
      on it.
    axis_name: instead of ``jit``, a step for ``jax.pmap(step, axis_name=...)`` (exclusive
      with ``mesh``).
    donate: donate the input state's buffers to the step (the old state must not be
      reused).

  >>> import vcon_jax as vj
  >>> vj.Parallel(axis_name="batch")
  Parallel(mesh=None, axis_name='batch', donate=True)
  """

  mesh: Mesh | None = None
  axis_name: str | None = None
  donate: bool = True


class BatchKeys(NamedTuple):
  """The batch entries the step reads: the model's input and the default loss's labels."""

  inputs: str = "inputs"
  labels: str = "labels"


class ModelKwargs(NamedTuple):
  """Extra keyword arguments of a Linen model's ``apply`` in training and in evaluation
  (e.g. ``ModelKwargs(train={"train": True}, eval={"train": False})``); ``None``: found
  from the model's ``__call__`` signature (see :func:`vcon_jax.make_train_step`)."""

  train: dict | None = None
  eval: dict | None = None


_OLD = {"mesh": "parallel", "axis_name": "parallel", "donate": "parallel",
        "input_key": "keys", "label_key": "keys", "train_kwargs": "model_kwargs",
        "eval_kwargs": "model_kwargs", "distill_weight": "loss_fn",
        "distill_temperature": "loss_fn", "distill_teacher": "loss_fn"}


def from_deprecated(old: dict, *, parallel: Any, keys: Any, model_kwargs: Any,
                    loss_fn: Any) -> tuple[Parallel, BatchKeys, ModelKwargs, Any]:
  """The step's option values, from the new keywords or the 0.3 ones (warned once each,
  naming the new spelling); an unknown keyword is a ``TypeError`` as Python's."""
  unknown = sorted(set(old) - set(_OLD))
  if unknown:
    raise TypeError(f"make_train_step() got unexpected keyword argument(s) {unknown}; "
                    f"its options are loss_fn, example, parallel, keys, model_kwargs, seed, "
                    f"blend, skip_nonfinite.")
  for group in sorted({_OLD[k] for k in old}):
    names = [k for k in old if _OLD[k] == group]
    new = {"parallel": "parallel=vj.Parallel(mesh=..., axis_name=..., donate=...)",
           "keys": "keys=vj.BatchKeys(inputs=..., labels=...)",
           "model_kwargs": "model_kwargs=vj.ModelKwargs(train=..., eval=...)",
           "loss_fn": "loss_fn=vj.distill(loss_fn, weight=..., temperature=..., "
                      "teacher=...)"}[group]
    if {"parallel": parallel, "keys": keys, "model_kwargs": model_kwargs}.get(group):
      raise ValueError(f"make_train_step: pass {group}= or the old keywords {names}, "
                       f"not both.")
    warnings.warn(f"make_train_step({', '.join(f'{k}=' for k in names)}) is deprecated; "
                  f"pass {new}.", DeprecationWarning, stacklevel=caller_level())
  parallel = parallel if parallel is not None else Parallel(
      old.get("mesh"), old.get("axis_name"), old.get("donate", True))
  keys = keys if keys is not None else BatchKeys(old.get("input_key", "inputs"),
                                                 old.get("label_key", "labels"))
  model_kwargs = model_kwargs if model_kwargs is not None else ModelKwargs(
      old.get("train_kwargs"), old.get("eval_kwargs"))
  for name, value, kind in (("parallel", parallel, Parallel), ("keys", keys, BatchKeys),
                            ("model_kwargs", model_kwargs, ModelKwargs)):
    if not isinstance(value, kind):
      raise ValueError(f"make_train_step: {name} must be a vj.{kind.__name__}, got "
                       f"{type(value).__name__}.")
  distilled = [k for k in ("distill_weight", "distill_temperature", "distill_teacher")
               if k in old]
  if distilled:
    d = distill(loss_fn, weight=old.get("distill_weight", 0.0),
                temperature=old.get("distill_temperature", 1.0),
                teacher=old.get("distill_teacher", "initial"))
    if d.weight > 0:
      loss_fn = d
  return parallel, keys, model_kwargs, loss_fn
