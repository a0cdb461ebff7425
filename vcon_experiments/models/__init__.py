"""Flax NNX classifiers and a causal LM for the compression experiments, by name.

All models take ``rngs: nnx.Rngs``, return logits, and switch between training and
evaluation with ``model.train()`` / ``model.eval()`` (Dropout and BatchNorm). Weight maps
are ``kernel`` leaves with ``ndim >= 2``; lookup tables are named ``embed``,
``pos_embedding`` or ``cls_token``. The names are the keys of
:data:`vcon_experiments.model_registry.REGISTRY`, the one registry of the suite's models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
  from vcon_experiments.config import Config


def get_model(name: str, **kwargs: Any) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: One of the keys of :data:`vcon_experiments.model_registry.REGISTRY`
      (``"mlp"``, ``"cnn"``, ``"vit"``, ``"transformer"``, ``"lm"``).
    **kwargs: Constructor arguments of the model. ``rngs`` defaults to ``nnx.Rngs(0)``;
      an ``int`` is taken as a seed.

  Returns:
    The initialised model (in training mode, as NNX modules start).

  Raises:
    ValueError: If ``name`` is not registered.
  """
  if name not in REGISTRY:
    raise ValueError(f"Unknown model {name!r}; valid names are: {', '.join(sorted(REGISTRY))}.")
  rngs = kwargs.pop("rngs", 0)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  return REGISTRY[name].load()(**kwargs, rngs=rngs)


def build_model(cfg: Config, seed: int = 0, role: str = "target") -> nnx.Module:
  """The model of ``cfg`` for the target task or, with ``role="source"``, for pretraining
  (the source classes, or the masked-byte language model of the text transfer regime).

  Raises:
    ValueError: if the model does not read the data set's kind of inputs.
  """
  # pylint: disable=import-outside-toplevel
  from vcon_experiments import data as vdata
  from vcon_experiments import tasks
  # pylint: enable=import-outside-toplevel
  spec = REGISTRY[cfg.model]
  info = vdata.dataset_info(cfg.dataset)
  if info.kind != spec.data:
    raise ValueError(f"model={cfg.model!r} reads {spec.data} inputs; dataset="
                     f"{cfg.dataset!r} is {info.kind}.")
  kwargs = {**spec.inputs(cfg.to_dict(), info), **cfg.model_kwargs}
  if role == "source" and cfg.regime == "transfer" and spec.source is not None:
    return spec.source()(**kwargs, rngs=nnx.Rngs(seed))
  if spec.classifier:
    kwargs.setdefault("num_classes", tasks.num_classes(cfg, role))
  return get_model(cfg.model, rngs=nnx.Rngs(seed), **kwargs)


__all__ = [
    "CNN",
    "CausalLM",
    "MLP",
    "FeedForward",
    "MaskedByteLM",
    "MultiHeadSelfAttention",
    "TextTransformer",
    "TransformerBlock",
    "ViT",
    "build_model",
    "get_model",
]
