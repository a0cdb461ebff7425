import flax.linen as _nn
import jax
import numpy as np
import optax as _optax
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


# ---- a learning-rate schedule passed as beta is refused by every entry point (issue 19)

LR_SCHEDULES = {
    "linear_from_1e-3": lambda: _optax.linear_schedule(1e-3, 0, 100),
    "warmup_cosine": lambda: _optax.warmup_cosine_decay_schedule(0, 1e-3, 10, 100),
    "constant_1e-3": lambda: _optax.constant_schedule(1e-3),
    "negative_after_20": lambda: (lambda c: 1 - c / 20),
}
ENTRY_POINTS = {
    "wrap_optax": lambda s: vj.wrap_optax(_optax.adamw(1e-2), vj.prune(0.9), s),
    "make_train_step": lambda s: vj.make_train_step(_nn.Dense(3), vj.prune(0.9), s),
    "chain_schedules": lambda s: vj.chain(vj.prune(0.5), vj.quantize(bits=4),
                                          schedules=[None, s]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("schedule", list(LR_SCHEDULES))
def test_learning_rate_schedules_are_refused_as_beta(entry, schedule):
  with pytest.raises(ValueError, match=r"learning-rate schedule|must stay in \[0, 1\]"):
    ENTRY_POINTS[entry](LR_SCHEDULES[schedule]())


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_beta_schedules_are_accepted(entry):
  for s in (vj.linear_vanish(10), vj.linear_vanish(0), vj.cosine_vanish(10),
            vj.constant(0.0), _optax.linear_schedule(1.0, 0.0, 50)):
    ENTRY_POINTS[entry](s)
  vj.chain(vj.prune(0.5), vj.quantize(bits=4), schedules=[None, vj.constant(0.5)])
