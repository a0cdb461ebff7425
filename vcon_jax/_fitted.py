"""A transition that fits the jump: VCON's transition length from how far the compressed
model starts from the dense one.

VCON pays off where the jump to the compressed model is big (binary, int2, low rank,
heavy pruning) and costs a little where it is small (int4, 2:4 on a model that barely
moves): a transition spent blending two nearly equal models is fine-tuning time lost. The
jump is measured once, before training, as the relative change of the model's outputs
(:func:`output_jump`), and the transition is a fixed share of the budget for a big jump,
shorter for a smaller one and none (post-shot) for a small one (:func:`fitted_transition`).
The measure is the same for every compression and every task: it reads only the outputs
(logits) of the dense and compressed models on the same inputs, so a classifier, a
language model and a fresh transfer head are measured alike (a head's random logits carry
the change of the features beneath it).

The constants were set on the repository's maps (``experiments/results/fitted_transition``:
every cell of the classifier map, the LM map and the structured-pruning cells) and are the
library's, not a data set's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from vcon_jax._schedules import linear_vanish
from vcon_jax._validate import as_int, is_number

#: Below this jump the transition is 0 (post-shot): the compressed model is close enough.
JUMP_LOW = 0.3
#: From this jump on the transition is the longest one (``max_fraction`` of the budget).
JUMP_HIGH = 0.5
#: The longest transition as a share of the budget (the paper's and 0.3's default, 20 %).
MAX_FRACTION = 0.2


def output_jump(dense_outputs: Any, compressed_outputs: Any) -> float:
  r"""How far the compressed model's outputs are from the dense model's on the same inputs.

  The root-mean-square of the change over that of the dense outputs, each centred over
  its last axis (a softmax ignores a shift of all logits):

  .. math:: J = \sqrt{\frac{\sum (\bar z_c - \bar z_d)^2}{\sum \bar z_d^2}},
     \qquad \bar z = z - \mathrm{mean}_{-1}(z)

  0: the same outputs; 1: a change as large as the outputs themselves. Trees of outputs
  (e.g. a model that returns a dataclass or a tuple) are summed over their leaves.

  >>> import numpy as np, vcon_jax as vj
  >>> round(vj.output_jump(np.array([[1.0, -1.0]]), np.array([[0.5, -0.5]])), 3)
  0.5
  """
  num, den = 0.0, 0.0
  dense = jax.tree.leaves(dense_outputs)
  compressed = jax.tree.leaves(compressed_outputs)
  if len(dense) != len(compressed) or not dense:
    raise ValueError(f"output_jump needs the dense and compressed outputs of the same "
                     f"model: got {len(dense)} and {len(compressed)} arrays.")
  for d, c in zip(dense, compressed):
    d = np.asarray(jax.device_get(d), np.float64)
    c = np.asarray(jax.device_get(c), np.float64)
    if d.shape != c.shape:
      raise ValueError(f"output_jump: dense outputs {d.shape} and compressed {c.shape} "
                       f"differ in shape.")
    if d.ndim:
      d = d - d.mean(-1, keepdims=True)
      c = c - c.mean(-1, keepdims=True)
    num += float(((c - d) ** 2).sum())
    den += float((d ** 2).sum())
  if not np.isfinite(num) or not np.isfinite(den):
    raise FloatingPointError("output_jump: the outputs are not finite.")
  if den == 0.0:
    raise ValueError("output_jump: the dense outputs are constant over their last axis "
                     "(all logits equal), so a relative change is not defined; measure on "
                     "real inputs, or pass a fixed schedule (vj.linear_vanish(Q)).")
  return float(np.sqrt(num / den))


def fitted_transition(jump: float, total_steps: int,
                      max_fraction: float = MAX_FRACTION) -> int:
  r"""The transition length ``Q`` (steps) for a measured :func:`output_jump`.

  .. math:: Q = \mathrm{round}\Big(T \cdot f_{max} \cdot
     \mathrm{clip}\big(\tfrac{J - J_{low}}{J_{high} - J_{low}}, 0, 1\big)\Big)

  with ``J_low = 0.3``, ``J_high = 0.5``: no transition (post-shot) below a jump of 0.3,
  the longest (``max_fraction`` of the ``T`` steps, default 20 %) from 0.5 on, linear in
  between.

  >>> import vcon_jax as vj
  >>> vj.fitted_transition(0.2, 1000), vj.fitted_transition(0.4, 1000), vj.fitted_transition(3.0, 1000)
  (0, 100, 200)
  """
  if not is_number(jump) or not np.isfinite(jump) or jump < 0:
    raise ValueError(f"jump must be a finite number >= 0 (vj.output_jump), got {jump!r}.")
  total_steps = as_int("total_steps", total_steps, 1)
  if not is_number(max_fraction) or not 0.0 <= max_fraction <= 1.0:
    raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction!r}.")
  share = min(max((float(jump) - JUMP_LOW) / (JUMP_HIGH - JUMP_LOW), 0.0), 1.0)
  return int(round(total_steps * max_fraction * share))


@dataclasses.dataclass(frozen=True)
class FittedVanish:
  """:func:`linear_vanish` with ``Q`` from the measured jump (:func:`fitted_vanish`).

  Attributes:
    total_steps: the fine-tuning budget ``T``.
    jump: the measured :func:`output_jump`, or ``None`` until
      :meth:`TrainStep.init <vcon_jax.TrainStep.init>` measures it on ``batch=``.
    max_fraction: the longest transition, as a share of ``T``.
  """

  total_steps: int
  jump: float | None = None
  max_fraction: float = MAX_FRACTION

  @property
  def transition_steps(self) -> int:
    if self.jump is None:
      raise ValueError(_UNMEASURED)
    return fitted_transition(self.jump, self.total_steps, self.max_fraction)

  def measured(self, jump: float) -> "FittedVanish":
    """This schedule with ``jump`` measured."""
    fitted_transition(jump, self.total_steps, self.max_fraction)  # validates
    return dataclasses.replace(self, jump=float(jump))

  def describe(self) -> str:
    q = self.transition_steps
    return (f"output jump {self.jump:.3f} -> transition {q} of {self.total_steps} steps "
            f"({100 * q / self.total_steps:.0f} %)")

  def __call__(self, count):
    return linear_vanish(self.transition_steps)(count)


_UNMEASURED = ("fitted_vanish(total_steps) has no jump yet: give make_train_step's init "
               "a batch (step.init(params, batch=first_batch)) to measure it, or pass "
               "jump=vj.output_jump(dense_logits, compressed_logits) yourself.")


def fitted_vanish(total_steps: int, jump: float | None = None,
                  max_fraction: float = MAX_FRACTION) -> FittedVanish:
  """The default beta schedule: :func:`linear_vanish` over a transition fitted to the jump.

  Leave ``jump`` out with :func:`make_train_step`: ``step.init(params, batch=b)`` measures
  the :func:`output_jump` of the compressed model on ``b`` (one dense and one compressed
  forward pass, in eval mode) and fixes ``Q`` with :func:`fitted_transition`. With
  :func:`wrap_optax`, measure it yourself and pass ``jump=`` (see the guide "your own
  loop"). The measured jump and ``Q`` are in ``repr(schedule)`` and
  :meth:`FittedVanish.describe`.

  >>> import vcon_jax as vj
  >>> s = vj.fitted_vanish(1000, jump=2.0)
  >>> s.transition_steps, float(s(100))
  (200, 0.5)
  """
  total_steps = as_int("total_steps", total_steps, 1)
  schedule = FittedVanish(total_steps, None, max_fraction)
  fitted_transition(0.0, total_steps, max_fraction)  # validates max_fraction
  return schedule if jump is None else schedule.measured(jump)


def check_measured(schedule: Any) -> None:
  """Refuses an unmeasured :class:`FittedVanish` where nothing can measure it."""
  if isinstance(schedule, FittedVanish) and schedule.jump is None:
    raise ValueError(_UNMEASURED)


def jump_of_step(step: Any, state: Any, batch: Any) -> float:
  """The output jump of a :class:`~vcon_jax.TrainStep`'s compressed model on ``batch``:
  the dense params and the exact compressed ones, each through the model in eval mode."""
  def forward(params, model_state, inputs):
    return step.adapter.apply(params, model_state, inputs, None, train=False)[0]

  forward = jax.jit(forward)
  inputs = batch[step.input_key]
  dense = forward(state.params, state.model_state, inputs)
  compressed = forward(step._compressed(state), state.model_state, inputs)  # pylint: disable=protected-access
  return output_jump(dense, compressed)
