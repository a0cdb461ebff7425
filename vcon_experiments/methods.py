"""The transform, beta schedule and distillation weight of a run, from its method's entry
in :data:`vcon_experiments.method_registry.REGISTRY`, all with the library's API.

- no transition (``post-shot``, ``post-shot-distill``): the target compression from step
  0 (``linear_vanish(0)``: beta = 0).
- ``"ramp"`` (``gradual``): beta = 0 throughout while the compression itself ramps in
  (Zhu and Gupta's cubic ramp, over the same ``transition`` as VCON's Q): sparsity 0 -> s,
  bit width 8 -> k (binary at the end for ``binarize``), rank full -> r.
- ``"beta"`` (``vcon``, ``vcon-distill``): the target compression, beta 1 -> 0 over Q
  steps: by default Q fitted to the output jump measured on the first batch
  (:func:`vcon_jax.fitted_vanish`, at most ``transition`` of the budget); with
  ``transition_rule="fixed"`` Q = ``transition`` of the budget (linear or cosine), after
  ``beta_hold`` of the budget at 1.
- distillation (``vcon-distill``, ``post-shot-distill``): the loss
  ``(1 - w) task + w KD``, KD the distillation from the frozen dense model it starts from
  (``loss_fn=vj.distill(task_loss, weight=w)``).
- no compression (``dense``): the same fine-tuning (the ceiling at equal budget).

The transform of each compression, target or ramp, is its entry in
:data:`vcon_experiments.compressions.REGISTRY`. What is compressed is what the paper
compresses: the linear maps *inside* the network (attention query/key/value/out, MLP
layers, convolutions after the first). The classifier head and the stem (the first
convolution, the ViT patch projection) stay dense, as do embeddings, position tables,
biases and norms (:data:`vcon_experiments.model_registry.KEEP_DENSE`).
"""

from __future__ import annotations

from typing import Any, Callable

import vcon_jax as vj
from vcon_experiments import compressions, method_registry
from vcon_experiments.config import Config


def hold_steps(cfg: Config) -> int:
  """Steps VCON holds beta at 1 before its transition (``cfg.beta_hold`` of the budget)."""
  return int(round(cfg.beta_hold * cfg.steps))


def transition_end(cfg: Config) -> int:
  """The step where beta reaches 0 (VCON) or the ramp ends (gradual); 0 for the methods
  without a transition."""
  transition = method_registry.REGISTRY[cfg.method].transition
  if transition is None:
    return 0
  q = int(round(cfg.transition * cfg.steps))
  return q + (hold_steps(cfg) if transition == "beta" else 0)


def build(cfg: Config, params: Any, model: Any = None,
          example: Any = None) -> tuple[vj.Transform, Callable, float]:
  """Returns ``(transform, beta_schedule, distill_weight)`` for ``cfg``; ``prune-units``
  also needs the model and an example input (its unit groups come from a trace)."""
  method = method_registry.REGISTRY[cfg.method]
  q = int(round(cfg.transition * cfg.steps))
  if not method.compresses:
    return vj.identity(), vj.constant(1.0), 0.0
  transform = compressions.REGISTRY[cfg.compression].build(
      cfg.to_dict(), params, model, example, method.transition == "ramp", q)
  if method.transition != "beta":
    schedule = vj.linear_vanish(0)
  elif cfg.transition_rule == "fitted":  # measured by step.init(batch=) (runner)
    schedule = vj.fitted_vanish(cfg.steps, max_fraction=cfg.transition)
  elif cfg.beta_schedule == "cosine":
    schedule = vj.cosine_vanish(q, begin_step=hold_steps(cfg))
  else:
    schedule = vj.linear_vanish(q, begin_step=hold_steps(cfg))
  distill = cfg.distill_weight if method.distill else 0.0
  return transform, schedule, distill
