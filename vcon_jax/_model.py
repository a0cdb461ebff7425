"""Adapters giving Linen and NNX models one pure interface.

``apply(params, model_state, inputs, rng, train) -> (logits, new_model_state)`` where
``params`` is a plain nested dict of the model's weights and ``model_state`` everything
else the model carries (BatchNorm statistics, NNX rng counters). PRNG key leaves in the
model state are kept as raw ``uint32`` key data so the state checkpoints like any array.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


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


def _data_to_keys(tree, template):
  return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x) if _is_key(t) else x,
                      tree, template)


def linen_adapter(model: nn.Module, train_kwargs: dict, eval_kwargs: dict) -> ModelAdapter:
  def split(variables):
    if not isinstance(variables, dict) and not hasattr(variables, "items"):
      raise ValueError(f"Linen params must be a dict (model.init's variables or their "
                       f"'params' entry), got {type(variables).__name__}.")
    variables = dict(variables)
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
  model.train()
  graph_train, params0, rest0 = nnx.split(model, nnx.Param, ...)
  model.eval()
  graph_eval = nnx.split(model, nnx.Param, ...)[0]
  model.train()
  rest_template = rest0.to_pure_dict()
  param_template = params0

  def split(params):
    if params is None:
      params = nnx.state(model, nnx.Param)
    if isinstance(params, nnx.Module):
      params = nnx.state(params, nnx.Param)
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else dict(params)
    return pure, _keys_to_data(rest_template)

  def apply(params, model_state, inputs, rng, train):
    rest = _data_to_keys(model_state, rest_template)
    module = nnx.merge(graph_train if train else graph_eval, params, rest)
    logits = module(inputs)
    if not train:
      return logits, model_state
    new_rest = nnx.split(module, nnx.Param, ...)[2].to_pure_dict()
    return logits, _keys_to_data(new_rest)

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
    return linen_adapter(model, dict(train_kwargs or {}), dict(eval_kwargs or {}))
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
