"""Flax NNX classifiers and a causal LM for the compression experiments, by name.

All models take ``rngs: nnx.Rngs``, return logits, and switch between training and
evaluation with ``model.train()`` / ``model.eval()`` (Dropout and BatchNorm). Weight maps
are ``kernel`` leaves with ``ndim >= 2``; lookup tables are named ``embed``,
``pos_embedding`` or ``cls_token``.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from vcon_experiments.model_registry import REGISTRY
from vcon_experiments.models.cnn import CNN
from vcon_experiments.models.lm import CausalLM
from vcon_experiments.models.mlp import MLP
from vcon_experiments.models.transformer import (
    FeedForward,
    MaskedByteLM,
    MultiHeadSelfAttention,
    TextTransformer,
    TransformerBlock,
    ViT,
)

#: Model constructors by name (:data:`vcon_experiments.model_registry.REGISTRY`'s).
MODELS: dict[str, type[nnx.Module]] = {name: spec.load() for name, spec in REGISTRY.items()}


def get_model(name: str, **kwargs: Any) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: One of the keys of :data:`MODELS` (``"mlp"``, ``"cnn"``, ``"vit"``,
      ``"transformer"``, ``"lm"``).
    **kwargs: Constructor arguments of the model. ``rngs`` defaults to ``nnx.Rngs(0)``;
      an ``int`` is taken as a seed.

  Returns:
    The initialised model (in training mode, as NNX modules start).

  Raises:
    ValueError: If ``name`` is not registered.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; valid names are: {', '.join(sorted(MODELS))}.")
  rngs = kwargs.pop("rngs", 0)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  return MODELS[name](**kwargs, rngs=rngs)


__all__ = [
    "CNN",
    "CausalLM",
    "MLP",
    "MODELS",
    "FeedForward",
    "MaskedByteLM",
    "MultiHeadSelfAttention",
    "TextTransformer",
    "TransformerBlock",
    "ViT",
    "get_model",
]
