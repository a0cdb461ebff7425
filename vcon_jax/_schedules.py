"""Beta schedules (1 -> 0) and ramps for the gradual baselines; optax-compatible.

Every schedule is a plain function ``count -> value`` made of ``jnp`` ops, so any optax
schedule works where a beta schedule is expected. Arguments are validated when the
factory is called.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from vcon_jax._validate import as_int, is_number

Schedule = Callable


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
  """A constant schedule (``constant(0.0)`` is the gradual baselines' beta):
  ``optax.constant_schedule`` of the value as a float32 scalar.

  Any finite number is accepted (it may be a bit width or a rank); where it is used as a
  beta, :func:`check_beta_schedule` refuses values outside ``[0, 1]``.
  """
  if not is_number(value) or not np.isfinite(value):
    raise ValueError(f"constant() needs a finite number, got {value!r}.")
  return optax.constant_schedule(np.float32(value))
