import jax
import numpy as np
import pytest

import vcon_jax as vj


@pytest.mark.parametrize("jit", [False, True])
def test_linear_vanish_reaches_zero_and_stays(jit):
  s = vj.linear_vanish(transition_steps=8)
  f = jax.jit(s) if jit else s
  values = np.array([float(f(t)) for t in range(20)])
  np.testing.assert_allclose(values[:9], 1 - np.arange(9) / 8)
  assert values[8] == 0.0 and np.all(values[8:] == 0.0)


def test_post_shot_is_zero_transition():
  s = vj.linear_vanish(0)
  assert float(s(0)) == 0.0 and float(s(100)) == 0.0


def test_cosine_vanish():
  s = vj.cosine_vanish(10)
  assert float(s(0)) == 1.0 and abs(float(s(5)) - 0.5) < 1e-6 and float(s(10)) == 0.0
  assert float(s(50)) == 0.0


def test_polynomial_ramp_is_cubic():
  s = vj.polynomial_ramp(0.9, begin_step=10, end_step=110)
  assert float(s(0)) == 0.0 and float(s(10)) == 0.0
  np.testing.assert_allclose(float(s(60)), 0.9 * (1 - 0.5 ** 3), rtol=1e-6)
  np.testing.assert_allclose(float(s(500)), 0.9, rtol=1e-6)


def test_optax_schedule_is_a_beta_schedule():
  import optax
  s = optax.linear_schedule(1.0, 0.0, 4)
  assert float(s(4)) == 0.0


@pytest.mark.parametrize("build,match", [
    (lambda: vj.linear_vanish(-1), "transition_steps"),
    (lambda: vj.cosine_vanish(-5), "transition_steps"),
    (lambda: vj.linear_vanish(10, begin_step=-1), "begin_step"),
    (lambda: vj.polynomial_ramp(0.9, 10, 5), "end_step must be >= begin_step"),
    (lambda: vj.polynomial_ramp(0.9, 0, 5, power=0), "power"),
])
def test_bad_schedule_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    build()
