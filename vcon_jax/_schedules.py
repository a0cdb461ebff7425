"""Beta schedules (1 -> 0) and ramps for the gradual baselines; optax-compatible.

Every schedule is a plain function ``count -> value`` made of ``jnp`` ops, so any optax
schedule works where a beta schedule is expected. Arguments are validated when the
factory is called.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax.numpy as jnp
from jax import lax
import numpy as np

Schedule = Callable

#: The smallest constant member beta :func:`vcon_jax.chain` takes as a deliberate blend.
MIN_PARTIAL_BETA = 0.01

#: Counts at which schedules are evaluated in Python when a factory receives one.
CHECK_COUNTS = (0, 1, 2, 3, 5, 10, 30, 100, 300, 1_000, 3_000, 10_000, 100_000, 1_000_000,
                10_000_000)


def as_int(name: str, value: Any, low: int, high: int | None = None,
           allow_none: bool = False) -> int | None:
  """``value`` as a Python int in ``[low, high]`` (numpy integers are integers too)."""
  if allow_none and value is None:
    return None
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
      or value < low or (high is not None and value > high)):
    span = f">= {low}" if high is None else f">= {low} and <= {high}"
    raise ValueError(f"{name} must be an integer {span}{' or None' if allow_none else ''}, "
                     f"got {value!r}.")
  return int(value)


def is_number(value: Any) -> bool:
  """A real number that is not a bool (Python or numpy scalar)."""
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def schedule_values(schedule: Callable, name: str,
                    counts: Sequence[int] = CHECK_COUNTS) -> list[tuple[int, float]]:
  """``[(count, float(schedule(count)))]``, evaluated eagerly at int32 counts (as optax
  passes them); a failure or a non-scalar, non-finite value is a ``ValueError``."""
  out = []
  for count in counts:
    try:
      value = np.asarray(schedule(jnp.asarray(count, jnp.int32)))
    except Exception as err:  # pylint: disable=broad-except
      raise ValueError(f"{name} could not be evaluated at count {count}: "
                       f"{type(err).__name__}: {err}") from err
    if value.shape != () or not np.issubdtype(value.dtype, np.number):
      raise ValueError(f"{name} must return a scalar number, {name}({count}) is "
                       f"{value!r}.")
    value = float(value)
    if not np.isfinite(value):
      raise ValueError(f"{name}({count}) = {value} is not finite.")
    out.append((count, value))
  return out


def check_schedule(schedule: Callable, name: str, ok: Callable[[float], bool],
                   allowed: str) -> None:
  """Evaluates ``schedule`` at :data:`CHECK_COUNTS`; ``ValueError`` where ``ok`` fails."""
  if not callable(schedule):
    raise ValueError(f"{name} must be a schedule (count -> value), got {schedule!r}.")
  for count, value in schedule_values(schedule, name):
    if not ok(value):
      raise ValueError(f"{name} must stay {allowed}, but {name}({count}) = {value:g}.")


def check_beta_schedule(schedule: Any, name: str = "beta", *,
                        start: Sequence[float] | None = (1.0, 0.0),
                        allow_constant: bool = False) -> Any:
  """Checks a beta schedule in Python, before any jit; returns it unchanged.

  A beta schedule gives the weight of the dense weights, so every value must lie in
  ``[0, 1]``, and the transition must begin at an end point: ``beta(0) = 1`` (VCON: the
  dense model first) or ``0`` (post-shot, :func:`linear_vanish` ``(0)``, and the gradual
  baselines' ``constant(0.0)``). A schedule starting elsewhere is almost always another
  schedule passed by mistake (e.g. a learning-rate schedule). The schedule is evaluated
  at :data:`CHECK_COUNTS`; a plain number is checked as a constant schedule.

  Args:
    schedule: ``count -> beta`` (any optax schedule) or a number.
    name: what to call it in the error message.
    start: the allowed values of ``beta(0)`` (to within 1e-6); ``None``: any in [0, 1].
      A schedule that starts at 0 must stay at 0 (post-shot); one that rises from 0 is
      a learning-rate warm-up, not a beta.
    allow_constant: also accept a constant schedule at a value in
      ``[MIN_PARTIAL_BETA, 1]`` (a chain member held at a partial blend on purpose,
      ``vj.constant(0.5)``); a constant below 1 % is a learning rate, not a blend.

  Returns:
    ``schedule``.

  Raises:
    ValueError: it is not callable, fails, returns a non-scalar, leaves ``[0, 1]`` or does
      not start at an allowed value.

  >>> import vcon_jax as vj
  >>> s = vj.check_beta_schedule(vj.linear_vanish(100))
  >>> vj.check_beta_schedule(vj.constant(5.0))
  Traceback (most recent call last):
  ...
  ValueError: beta must stay in [0, 1] (it weighs the dense weights), but beta(0) = 5.
  """
  if is_number(schedule):
    values = [(0, float(schedule))]
  elif callable(schedule):
    values = schedule_values(schedule, name)
  else:
    raise ValueError(f"{name} must be a schedule count -> beta in [0, 1] (e.g. "
                     f"vj.linear_vanish(Q)) or a number, got {schedule!r}.")
  for count, value in values:
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must stay in [0, 1] (it weighs the dense weights), but "
                       f"{name}({count}) = {value:g}.")
  first = values[0][1]
  # a deliberate partial blend is a constant of at least 1 %; learning rates are smaller
  constant = all(v == first for _, v in values) and first >= MIN_PARTIAL_BETA
  hint = "is it a learning-rate schedule? Use e.g. vj.linear_vanish(transition_steps)."
  if start is not None and not (allow_constant and constant) and not any(
      abs(first - s) <= 1e-6 for s in start):
    allowed = " or ".join(f"{s:g}" for s in start)
    raise ValueError(f"{name} must start at {allowed} (1: VCON, dense first; 0: post-shot "
                     f"or gradual baselines), but {name}(0) = {first:g}; {hint}")
  if abs(first) <= 1e-6:
    rise = next(((c, v) for c, v in values if v > 1e-6), None)
    if rise is not None:
      raise ValueError(f"{name} starts at 0 (the compressed model) and must stay there, "
                       f"but {name}({rise[0]}) = {rise[1]:g}; {hint}")
  return schedule


def _check_steps(name: str, value) -> int:
  return as_int(name, value, 0)


def linear_vanish(transition_steps: int, begin_step: int = 0) -> Schedule:
  r"""The paper's schedule: ``beta_t = clip(1 - (t - begin) / Q, 0, 1)``.

  Reaches exactly 0 at ``t = begin + Q`` and stays there; ``Q = 0`` is the post-shot
  baseline (beta is 0 from the first step). For ``Q > 0`` it is
  ``optax.linear_schedule(1.0, 0.0, Q, begin)``, bit for bit when run eagerly; it is not
  built on it because under ``jit`` XLA rounds optax's order of operations differently (a
  1-ulp change of beta that would change every stored result), and optax's ``Q = 0``
  holds beta at 1.

  .. math:: \beta_t = \max(1 - t / Q, 0)

  >>> import vcon_jax as vj
  >>> float(vj.linear_vanish(transition_steps=10)(5))
  0.5
  """
  transition_steps = _check_steps("transition_steps", transition_steps)
  begin_step = _check_steps("begin_step", begin_step)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32) - begin_step
    if transition_steps == 0:
      return jnp.where(t >= 0, 0.0, 1.0).astype(jnp.float32)
    # the barrier keeps a true division under jit (XLA turns ``t / constant`` into
    # ``t * (1 / constant)``, 1 ulp off): beta is the same in a jitted step and a view
    q = lax.optimization_barrier(jnp.float32(transition_steps))
    return jnp.clip(1.0 - t / q, 0.0, 1.0)

  return schedule


def cosine_vanish(transition_steps: int, begin_step: int = 0) -> Schedule:
  r"""Half-cosine from 1 to 0 over ``transition_steps``, then 0.

  .. math:: \beta_t = \tfrac12 (1 + \cos(\pi \min(t / Q, 1)))

  ``optax.cosine_decay_schedule(1.0, Q)`` up to rounding (it has no ``begin_step`` or
  ``Q = 0`` form and computes ``pi * t / Q`` in another order).

  >>> import vcon_jax as vj
  >>> float(vj.cosine_vanish(transition_steps=10)(10))
  0.0
  """
  transition_steps = _check_steps("transition_steps", transition_steps)
  begin_step = _check_steps("begin_step", begin_step)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32) - begin_step
    if transition_steps == 0:
      return jnp.where(t >= 0, 0.0, 1.0).astype(jnp.float32)
    p = jnp.clip(t / transition_steps, 0.0, 1.0)
    return jnp.where(p >= 1.0, 0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * p)))

  return schedule


def polynomial_ramp(final: float, begin_step: int, end_step: int, initial: float = 0.0,
                    power: float = 3.0) -> Schedule:
  r"""Zhu and Gupta's gradual ramp (cubic by default), e.g. sparsity 0 -> 0.9.

  .. math:: s_t = s_f + (s_i - s_f) (1 - \mathrm{clip}((t - t_0) / (t_1 - t_0), 0, 1))^p

  For ``t_1 > t_0``, ``optax.polynomial_schedule(s_i, s_f, p, t_1 - t_0, t_0)`` (bit for bit
  eagerly, to 1 ulp under ``jit``: kept as is for the reason given in
  :func:`linear_vanish`); with ``t_1 = t_0`` the value jumps to ``s_f`` at ``t_0``.

  >>> import vcon_jax as vj
  >>> round(float(vj.polynomial_ramp(0.9, 0, 100)(100)), 6)
  0.9
  """
  begin_step = _check_steps("begin_step", begin_step)
  end_step = _check_steps("end_step", end_step)
  if not (is_number(final) and is_number(initial) and is_number(power)):
    raise ValueError(f"final, initial and power must be numbers, got final={final!r}, "
                     f"initial={initial!r}, power={power!r}.")
  final, initial, power = float(final), float(initial), float(power)
  if end_step < begin_step:
    raise ValueError(f"end_step must be >= begin_step, got begin_step={begin_step}, "
                     f"end_step={end_step}.")
  if power <= 0:
    raise ValueError(f"power must be > 0, got {power!r}.")
  span = max(end_step - begin_step, 1)

  def schedule(count):
    p = jnp.clip((jnp.asarray(count, jnp.float32) - begin_step) / span, 0.0, 1.0)
    if end_step == begin_step:
      p = jnp.where(jnp.asarray(count) >= begin_step, 1.0, 0.0)
    return final + (initial - final) * (1.0 - p) ** power

  return schedule


def constant(value: float) -> Schedule:
  """A constant schedule (``constant(0.0)`` is the gradual baselines' beta).

  Any finite number is accepted (it may be a bit width or a rank); where it is used as a
  beta, :func:`check_beta_schedule` refuses values outside ``[0, 1]``.
  """
  if not is_number(value) or not np.isfinite(value):
    raise ValueError(f"constant() needs a finite number, got {value!r}.")
  value = float(value)
  return lambda count: jnp.asarray(value, jnp.float32)
