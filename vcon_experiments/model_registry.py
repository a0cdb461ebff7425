"""The models of the suite: one entry each.

An entry names the model's class (imported only when a model is built, so that this
registry, and :mod:`vcon_experiments.config` which reads its names, stay free of JAX),
the constructor arguments the data decides (input size, vocabulary), the layers every
compression leaves dense (the task's output layers and the stem: :data:`KEEP_DENSE`) and,
for the text transfer regime, the pretraining model. This module imports nothing of the
suite but its byte tokenizer (when a text model is built), so that everything may read
it; :func:`vcon_experiments.models.build_model` builds the model of a config from it.

A new model: its module in :mod:`vcon_experiments.models` and one :class:`ModelSpec` in
:data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Mapping
from typing import Any, Callable


def _load(module: str, name: str) -> Callable[[], type]:
  """A function returning class ``name`` of ``vcon_experiments.models.<module>``."""
  return lambda: getattr(importlib.import_module(f"vcon_experiments.models.{module}"), name)


def _byte_vocab() -> int:
  # pylint: disable-next=import-outside-toplevel
  from vcon_experiments.data.tokenizer import ByteTokenizer
  return ByteTokenizer.vocab_size


def _flat_inputs(cfg: Mapping, info: Any) -> dict:
  return {"in_features": math.prod(info.input_shape)}


def _image_inputs(cfg: Mapping, info: Any) -> dict:
  return {"in_channels": info.input_shape[-1], "image_size": info.input_shape[0]}


def _text_inputs(cfg: Mapping, info: Any) -> dict:
  # transfer: one more id, the [MASK] token of the masked-byte pretraining
  extra = 1 if cfg["regime"] == "transfer" else 0
  return {"vocab_size": _byte_vocab() + extra, "max_len": cfg["max_len"]}


def _lm_inputs(cfg: Mapping, info: Any) -> dict:
  return {"vocab_size": _byte_vocab(), "max_len": cfg["max_len"]}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model of the suite.

  Attributes:
    load: returns the model's class (an ``nnx.Module`` taking ``rngs``).
    data: the kind of data set it reads (``"image"`` or ``"text"``).
    inputs: ``(config dict, dataset info) -> constructor defaults`` the data decides
      (the dict is ``Config.to_dict()``); ``model_kwargs`` override them.
    heads: the task's output layers (top-level names): left dense; on a new task
      (``transfer``) the pretraining model's are dropped, and with ``init_from`` one whose
      shape differs is left fresh.
    stem: further path segments left dense (the first layer on the input).
    classifier: takes ``num_classes`` (the task's class count); ``False``: the LM.
    source: returns the pretraining model's class of the text transfer regime, or
      ``None`` (pretrained as itself).
  """

  load: Callable[[], type]
  data: str
  inputs: Callable[[Mapping, Any], dict]
  heads: tuple[str, ...] = ("head",)
  stem: tuple[str, ...] = ()
  classifier: bool = True
  source: Callable[[], type] | None = None

  @property
  def keep_dense(self) -> tuple[str, ...]:
    """The path segments every compression leaves dense."""
    return self.heads + self.stem


#: Every model by its ``Config.model`` name.
REGISTRY: dict[str, ModelSpec] = {
    "mlp": ModelSpec(_load("mlp", "MLP"), "image", _flat_inputs),
    "cnn": ModelSpec(_load("cnn", "CNN"), "image", _image_inputs, stem=("convs/0",)),
    "vit": ModelSpec(_load("transformer", "ViT"), "image", _image_inputs,
                     stem=("patch_proj",)),
    "transformer": ModelSpec(_load("transformer", "TextTransformer"), "text", _text_inputs,
                             heads=("head", "lm_head"),
                             source=_load("transformer", "MaskedByteLM")),
    "lm": ModelSpec(_load("lm", "CausalLM"), "text", _lm_inputs, heads=("lm_head",),
                    classifier=False),
}


def _keep_dense_pattern(specs) -> str:
  """A regex matching every model's dense layers on whole path segments."""
  parts = sorted({p for spec in specs for p in spec.keep_dense})
  names = "|".join(re.escape(p) for p in parts if "/" not in p)
  nested = "".join(f"|(^|/){re.escape(p)}(/|$)" for p in parts if "/" in p)
  return f"(^|/)({names})(/|$){nested}"


#: What every compression leaves dense: the classifier and LM heads and the stems (first
#: conv, ViT patch projection), matched on whole path segments; embeddings, position
#: tables, biases and norms are not selected by the library's defaults anyway.
KEEP_DENSE = _keep_dense_pattern(REGISTRY.values())

