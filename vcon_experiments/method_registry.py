"""The methods of the suite: one entry each, saying what the method does over a run.

A method is what happens between the dense model and the compressed one within the
fine-tuning budget: whether it compresses at all, what changes over the transition
(``Config.transition`` of the budget), and whether the loss adds distillation. Run names,
validation, the transform and beta schedule a run trains with
(:func:`vcon_experiments.methods.build`), the jobs of a preset and the tables read these
entries; none of them compares method names. This module imports nothing of the suite,
so that everything may read it.

A new method: one :class:`Method` in :data:`REGISTRY` (and, if it needs a new kind of
transition, that kind in :func:`vcon_experiments.methods.build`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Method:
  """One method of the suite.

  Attributes:
    label: what it does, in a few words (``--method``'s help).
    transition: what changes over the transition of ``Q`` steps (``transition`` of the
      budget): ``"beta"``, the blend weight beta goes from 1 to 0 (``beta_schedule``'s
      shape, after ``beta_hold`` of the budget at 1: VCON); ``"ramp"``, the compression
      itself ramps from none to its target while beta is 0 (gradual); ``None``, nothing
      changes (beta is 0 from step 0: the target compression throughout). The beta
      schedule follows: 1 -> 0 for ``"beta"``, 0 otherwise. A method with a transition
      is named by its ``Q`` and ``lr_schedule`` in run directories, and
      ``lr_schedule="restart"`` restarts where its transition ends.
    compresses: ``False``: the same fine-tuning without compression (``dense``; one run
      serves every severity, and nothing is exported).
    distill: the loss is ``(1 - w) task + w KD``, KD the distillation from the frozen
      dense model the run starts from (``w``: ``distill_weight``); refused in the
      transfer regime, where that model's head for the target classes is untrained.
    headline: one of the methods compared by default: a preset suite that lists no
      methods runs these, and the headline table has a column for each.
  """

  label: str
  transition: Literal["beta", "ramp"] | None = None
  compresses: bool = True
  distill: bool = False
  headline: bool = False

  @property
  def beta_at_start(self) -> float:
    """Beta at step 0: 1 where it vanishes over the transition, else 0 (a dense run
    keeps the dense path, but nothing is blended with it)."""
    return 1.0 if self.transition == "beta" else 0.0


#: Every method by its ``Config.method`` name, in the order the CLI lists them.
REGISTRY: dict[str, Method] = {
    "post-shot": Method("the target compression from step 0", headline=True),
    "gradual": Method("Zhu-Gupta cubic ramp of sparsity, bit width or rank over the "
                      "transition", transition="ramp", headline=True),
    "vcon": Method("beta 1 -> 0 over the transition", transition="beta", headline=True),
    "vcon-distill": Method("vcon plus distillation from the dense model", transition="beta",
                           distill=True, headline=True),
    "dense": Method("the same fine-tuning without compression", compresses=False),
    "post-shot-distill": Method("post-shot with vcon-distill's distillation term",
                                distill=True),
}

#: The methods a preset suite runs unless it lists its own, in registry order.
HEADLINE: tuple[str, ...] = tuple(name for name, m in REGISTRY.items() if m.headline)

#: The method every other is measured against: the share of the dense - baseline gap a
#: method closes, and the map's paired differences.
BASELINE = "post-shot"


def fits_regime(method: str, regime: str) -> bool:
  """No distillation in the transfer regime: its teacher would be the frozen starting
  model, whose head for the target classes is untrained."""
  return not (regime == "transfer" and REGISTRY[method].distill)
