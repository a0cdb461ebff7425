"""The beta schedules are optax's formulas: equal eagerly, within 1 ulp under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vcon_jax as vj

_COUNTS = np.arange(0, 260, dtype=np.int32)

CASES = {
    "linear": (lambda: vj.linear_vanish(100, begin_step=20),
               lambda: optax.linear_schedule(1.0, 0.0, 100, 20)),
    "linear_short": (lambda: vj.linear_vanish(7), lambda: optax.linear_schedule(1.0, 0.0, 7)),
    "ramp": (lambda: vj.polynomial_ramp(0.9, 10, 137),
             lambda: optax.polynomial_schedule(0.0, 0.9, 3.0, 127, 10)),
    "cosine": (lambda: vj.cosine_vanish(100), lambda: optax.cosine_decay_schedule(1.0, 100)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedules_match_optax(name):
  ours, theirs = (f() for f in CASES[name])
  eager = np.array([np.asarray(ours(int(c))) for c in _COUNTS])
  reference = np.array([np.asarray(theirs(int(c)), np.float32) for c in _COUNTS])
  if name != "cosine":  # same order of operations: the same bits
    np.testing.assert_array_equal(eager, reference)
  jitted = np.asarray(jax.jit(jax.vmap(ours))(jnp.asarray(_COUNTS)))
  np.testing.assert_allclose(jitted, reference, rtol=0, atol=2.4e-7)


def test_zero_length_transitions_differ_from_optax_on_purpose():
  assert float(vj.linear_vanish(0)(0)) == 0.0  # post-shot: compressed from step 0
  assert float(optax.linear_schedule(1.0, 0.0, 0)(0)) == 1.0
