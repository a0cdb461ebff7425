"""Methods as (transform, beta schedule, distillation weight), all with the library's API.

- ``post-shot``: the target compression from step 0 (``linear_vanish(0)``: beta = 0).
- ``gradual``: beta = 0 throughout while the compression itself ramps in (Zhu and Gupta's
  cubic ramp, over the same ``transition`` as VCON's Q): sparsity 0 -> s, bit width
  8 -> k (binary at the end for ``binarize``), rank full -> r.
- ``vcon``: the target compression, beta 1 -> 0 over Q steps (linear or cosine).
- ``vcon-distill``: ``vcon`` plus a distillation term from the dense path (beta = 1 logits).
- ``dense``: the same fine-tuning without compression (the ceiling at equal budget).

What is compressed is what the paper compresses: the linear maps *inside* the network
(attention query/key/value/out, MLP layers, convolutions after the first). The classifier
head and the stem (the first convolution, the ViT patch projection) stay dense, as do
embeddings, position tables, biases and norms (:data:`KEEP_DENSE`).
"""

from __future__ import annotations

from typing import Any, Callable

import vcon_jax as vj
from vcon_jax import _paths
from vcon_experiments.config import Config, pattern_of

#: The classifier head and the stem (first conv, patch projection) stay dense, as in the
#: reference; matched on whole path segments.
KEEP_DENSE = r"(^|/)(head|lm_head|patch_proj)(/|$)|(^|/)convs/0(/|$)"


def _low_rank_full(params: Any) -> int:
  """The largest full rank among the leaves low rank selects (the gradual ramp's start):
  the transform's own selection and each kernel's real input axes."""
  select = vj.low_rank(1, exclude=KEEP_DENSE).select
  declared = _paths.compile_in_axes(None)
  sizes = [min(_paths.matricize_shape(leaf.shape,
                                      _paths.input_axes(path, leaf.shape, declared)))
           for path, leaf in _paths.leaf_paths(params) if select(path, leaf)]
  return max(sizes) if sizes else 1


def hold_steps(cfg: Config) -> int:
  """Steps VCON holds beta at 1 before its transition (``cfg.beta_hold`` of the budget)."""
  return int(round(cfg.beta_hold * cfg.steps))


def transition_end(cfg: Config) -> int:
  """The step where beta reaches 0 (VCON) or the ramp ends (gradual); 0 for the others."""
  if cfg.method in ("post-shot", "dense"):
    return 0
  q = int(round(cfg.transition * cfg.steps))
  return q + (hold_steps(cfg) if cfg.method != "gradual" else 0)


def build(cfg: Config, params: Any, model: Any = None,
          example: Any = None) -> tuple[vj.Transform, Callable, float]:
  """Returns ``(transform, beta_schedule, distill_weight)`` for ``cfg``; ``prune-units``
  also needs the model and an example input (its unit groups come from a trace)."""
  q = int(round(cfg.transition * cfg.steps))
  gradual = cfg.method == "gradual"
  if cfg.method == "dense":
    return vj.identity(), vj.constant(1.0), 0.0
  if cfg.compression == "prune" and cfg.pattern:
    n, m = pattern_of(cfg.pattern)
    if gradual:  # keep-the-largest within each group of m, the kept share ramped to n/m
      transform = vj.prune(sparsity=vj.polynomial_ramp(1 - n / m, 0, q), granularity="group",
                           group_size=m, update_every=cfg.update_every, exclude=KEEP_DENSE)
    else:
      transform = vj.prune(n=n, m=m, update_every=cfg.update_every, exclude=KEEP_DENSE)
  elif cfg.compression == "prune":
    sparsity = vj.polynomial_ramp(cfg.sparsity, 0, q) if gradual else cfg.sparsity
    transform = vj.prune(sparsity=sparsity, update_every=cfg.update_every, exclude=KEEP_DENSE)
  elif cfg.compression == "prune-units":
    if model is None or example is None:
      raise ValueError("prune-units needs the model and an example input: "
                       "methods.build(cfg, params, model, example).")
    units = vj.find_units(model, None, example)
    fraction = vj.polynomial_ramp(cfg.sparsity, 0, q) if gradual else cfg.sparsity
    transform = vj.prune_units(fraction, units=units)
  elif cfg.compression == "binarize":
    transform = (vj.quantize(bits=vj.polynomial_ramp(1, 0, q, initial=8), per_channel=False,
                             exclude=KEEP_DENSE)
                 if gradual else vj.binarize(exclude=KEEP_DENSE))
  elif cfg.compression == "quantize":
    bits = vj.polynomial_ramp(cfg.bits, 0, q, initial=8) if gradual else cfg.bits
    transform = vj.quantize(bits=bits, group_size=cfg.group_size or None,
                            exclude=KEEP_DENSE)
  else:
    if gradual:
      full = _low_rank_full(params)
      transform = vj.low_rank(rank=vj.polynomial_ramp(cfg.rank, 0, q, initial=full),
                              exclude=KEEP_DENSE)  # factors: each leaf's full rank
    else:
      transform = vj.low_rank(rank=cfg.rank, exclude=KEEP_DENSE)
  if cfg.method in ("post-shot", "gradual"):
    schedule = vj.linear_vanish(0)
  elif cfg.beta_schedule == "cosine":
    schedule = vj.cosine_vanish(q, begin_step=hold_steps(cfg))
  else:
    schedule = vj.linear_vanish(q, begin_step=hold_steps(cfg))
  distill = cfg.distill_weight if cfg.method == "vcon-distill" else 0.0
  return transform, schedule, distill
