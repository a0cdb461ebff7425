"""Adapters giving Linen and NNX models one pure interface.

``apply(params, model_state, inputs, rng, train) -> (logits, new_model_state)`` where
``params`` is a plain nested dict of the model's weights and ``model_state`` everything
else the model carries (BatchNorm statistics, NNX rng counters). PRNG key leaves in the
model state are kept as raw ``uint32`` key data so the state checkpoints like any array.

In training the step's ``rng`` (seed, step and device index folded in) is folded into
every NNX rng stream, as Linen's ``rngs={'dropout': rng}`` does, and a Linen model's
``train``/``deterministic`` argument is passed when the user gave no kwargs. The user's
NNX module is left in the mode (``train()``/``eval()``) it had.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from vcon_jax import _checks


class ModelAdapter(NamedTuple):
  kind: str  # "linen" or "nnx"
  split: Callable[[Any], tuple[Any, Any]]  # user params -> (params dict, model_state)
  apply: Callable[..., tuple[jax.Array, Any]]
  wrap_params: Callable[[Any], Any]  # params dict -> the tree type the user's model takes
  # (params dict, model_state) -> NNX: the module, updated in place; Linen: variables dict
  assign: Callable[[Any, Any], Any]


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, template, rng=None):
  """Typed keys back from their data; with ``rng``, each key has the step rng folded in."""
  salt = None if rng is None else jax.random.bits(rng, (), jnp.uint32)

  def to_key(x, t):
    if not _is_key(t):
      return x
    key = jax.random.wrap_key_data(x)
    return key if salt is None else jax.random.fold_in(key, salt)

  return jax.tree.map(to_key, tree, template)


def _keep_keys(new, old, template):
  """``new`` with the key leaves of ``old``: the folded per-step keys are not stored."""
  return jax.tree.map(lambda n, o, t: o if _is_key(t) else n, new, old, template)


# Linen ``__call__`` arguments that switch training on, and their value in training.
TRAIN_FLAGS = {"train": True, "training": True, "is_training": True,
               "deterministic": False}


def linen_mode_kwargs(model: nn.Module, train_kwargs: dict | None,
                      eval_kwargs: dict | None) -> tuple[dict, dict]:
  """The keyword arguments of a Linen model's ``apply`` in training and evaluation.

  Given kwargs are used as they are. When one is ``None`` and the model's ``__call__``
  has exactly one argument of :data:`TRAIN_FLAGS` (``train``, ``training``,
  ``is_training``, ``deterministic``), it is set for that mode (``train=True`` /
  ``deterministic=False`` in training, the opposite in evaluation); with several such
  arguments the choice is ambiguous and a ``ValueError`` asks for ``train_kwargs``.
  """
  try:
    names = inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):  # no introspectable signature: nothing to infer
    names = {}
  flags = [n for n in TRAIN_FLAGS if n in names]
  if len(flags) > 1 and (train_kwargs is None or eval_kwargs is None):
    raise ValueError(f"{type(model).__name__}.__call__ has several training switches "
                     f"{flags}; pass train_kwargs= and eval_kwargs= (e.g. "
                     f"train_kwargs={{{flags[0]!r}: {TRAIN_FLAGS[flags[0]]}}}).")
  if flags:
    flag = flags[0]
    if train_kwargs is None:
      train_kwargs = {flag: TRAIN_FLAGS[flag]}
    if eval_kwargs is None:
      eval_kwargs = {flag: not TRAIN_FLAGS[flag]}
  return dict(train_kwargs or {}), dict(eval_kwargs or {})


def _mode_attributes(model: nnx.Module) -> list[tuple[Any, str, Any]]:
  """The attributes ``Module.train()``/``eval()`` set, with their current values."""
  return [(module, name, getattr(module, name)) for _, module in nnx.iter_modules(model)
          for name in ("deterministic", "use_running_average") if hasattr(module, name)]


def linen_adapter(model: nn.Module, train_kwargs: dict | None,
                  eval_kwargs: dict | None) -> ModelAdapter:
  train_kwargs, eval_kwargs = linen_mode_kwargs(model, train_kwargs, eval_kwargs)

  def split(variables):
    if not isinstance(variables, dict) and not hasattr(variables, "items"):
      raise ValueError(f"Linen params must be a dict (model.init's variables or their "
                       f"'params' entry), got {type(variables).__name__}.")
    variables = dict(variables)
    _checks.check_linen_variables(variables)
    if "params" in variables:
      params = variables.pop("params")
      return params, variables
    return variables, {}

  def apply(params, model_state, inputs, rng, train):
    variables = {"params": params, **model_state}
    kwargs = train_kwargs if train else eval_kwargs
    rngs = {"dropout": rng} if rng is not None else None
    if train and model_state:
      logits, new_state = model.apply(variables, inputs, rngs=rngs,
                                      mutable=list(model_state), **kwargs)
      return logits, dict(new_state)
    return model.apply(variables, inputs, rngs=rngs, **kwargs), model_state

  return ModelAdapter("linen", split, apply, lambda p: p,
                      lambda params, model_state: {"params": params, **model_state})


def nnx_adapter(model: nnx.Module) -> ModelAdapter:
  modes = _mode_attributes(model)
  try:
    model.train()
    graph_train, params0, rest0 = nnx.split(model, nnx.Param, ...)
    model.eval()
    graph_eval = nnx.split(model, nnx.Param, ...)[0]
  finally:  # the user's module keeps the mode it had
    for module, name, value in modes:
      setattr(module, name, value)
  rest_template = rest0.to_pure_dict()
  param_template = params0

  def split(params):
    if params is None:
      params = nnx.state(model, nnx.Param)
    if isinstance(params, nnx.Module):
      params = nnx.state(params, nnx.Param)
    if not isinstance(params, dict) and not hasattr(params, "items"):
      raise ValueError(f"an NNX step takes step.init() or step.init(nnx.state(module, "
                       f"nnx.Param)), got {type(params).__name__}.")
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else dict(params)
    _checks.check_nnx_params(pure, param_template.to_pure_dict())
    return pure, _keys_to_data(rest_template)

  def apply(params, model_state, inputs, rng, train):
    # The step rng (seed, step and device index folded in) salts every NNX rng stream,
    # so dropout differs per device and per seed as it does for Linen.
    rest = _data_to_keys(model_state, rest_template, rng if train else None)
    module = nnx.merge(graph_train if train else graph_eval, params, rest)
    logits = module(inputs)
    if not train:
      return logits, model_state
    new_rest = nnx.split(module, nnx.Param, ...)[2].to_pure_dict()
    return logits, _keep_keys(_keys_to_data(new_rest), model_state, rest_template)

  def wrap_params(pure):
    state = jax.tree.map(lambda x: x, param_template)
    nnx.replace_by_pure_dict(state, pure)
    return state

  def assign(params, model_state):
    rest = jax.tree.map(lambda x: x, rest0)
    nnx.replace_by_pure_dict(rest, _data_to_keys(model_state, rest_template))
    nnx.update(model, wrap_params(params), rest)
    return model

  return ModelAdapter("nnx", split, apply, wrap_params, assign)


def make_adapter(model: Any, train_kwargs: dict | None, eval_kwargs: dict | None
                 ) -> ModelAdapter:
  if isinstance(model, nnx.Module):
    if train_kwargs or eval_kwargs:
      raise ValueError("train_kwargs/eval_kwargs are for Linen models; an NNX model is "
                       "switched with model.train()/model.eval(), which the step does.")
    return nnx_adapter(model)
  if isinstance(model, nn.Module):
    return linen_adapter(model, train_kwargs, eval_kwargs)
  raise ValueError(f"model must be a flax.linen.Module or a flax.nnx.Module, got "
                   f"{type(model).__name__}.")


def model_kind(model: Any) -> str:
  """``"nnx"`` or ``"linen"``: which adapter :func:`make_adapter` gives ``model``.

  >>> from flax import linen as nn
  >>> model_kind(nn.Dense(3))
  'linen'
  """
  if isinstance(model, nnx.Module):
    return "nnx"
  if isinstance(model, nn.Module):
    return "linen"
  raise ValueError(f"model must be a flax.linen.Module or a flax.nnx.Module, got "
                   f"{type(model).__name__}.")
