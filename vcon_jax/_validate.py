"""Argument checks, run in Python before anything is traced or written.

Numbers (:func:`as_int`, :func:`is_number`, :func:`fraction_or_schedule`,
:func:`int_or_schedule`), schedules (:func:`schedule_values`, :func:`check_schedule`,
:func:`check_beta_schedule`, :func:`check_step_schedule`) and the training pieces
(:func:`check_optimizer`; ``_transform.check_transform`` sits beside the type it checks,
so this module imports none of the library's). Each raises a ``ValueError`` that names the
argument, its value and what is allowed. What a call receives at run time (batches,
labels, states, loss outputs) is checked in ``_checks``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

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


def fraction_or_schedule(name: str, value: Any) -> Any:
  """A share in ``[0, 1)`` (a float) or a schedule whose values stay there (a sparsity,
  the fraction of units removed)."""
  if callable(value):
    check_schedule(value, name, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    return value
  if not is_number(value) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be a number in [0, 1) or a schedule, got {value!r}.")
  return float(value)


def int_or_schedule(name: str, value: Any, low: int, high: int | None = None) -> Any:
  """An integer in ``[low, high]`` or a schedule whose rounded values stay there (a bit
  width, a rank)."""
  if callable(value):
    allowed = (f">= {low} once rounded" if high is None
               else f"in [{low}, {high}] once rounded")
    check_schedule(value, name,
                   lambda v: low <= round(v) and (high is None or round(v) <= high), allowed)
    return value
  return as_int(name, value, low, high)


def as_bool(name: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return value


def check_step_schedule(schedule: Any) -> None:
  """The beta schedule of a train step or ``wrap_optax``: callable, scalar, in [0, 1],
  starting at 1 or 0 (a learning-rate schedule is refused)."""
  if not callable(schedule):
    raise ValueError(f"schedule must be callable (count -> beta in [0, 1], e.g. "
                     f"vj.linear_vanish(1000) or any optax schedule), got {schedule!r}.")
  try:
    beta0 = schedule(0)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"schedule(0) failed ({err}); a schedule maps a step count to "
                     f"beta.") from err
  if np.shape(beta0) != ():
    raise ValueError(f"schedule must return a scalar beta, schedule(0) has shape "
                     f"{np.shape(beta0)}.")
  # values in [0, 1], starting at 1 (VCON) or 0 (post-shot): refuses an lr schedule
  check_beta_schedule(schedule, "beta_schedule")


def check_optimizer(optimizer: Any) -> None:
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f"optimizer must be an optax.GradientTransformation, got "
                     f"{type(optimizer).__name__}.")
