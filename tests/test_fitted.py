"""The fitted transition (issue 32): the jump measure, the rule, and the schedule on every
path (own step, init refusals, wrap_optax, resume)."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import vcon_jax as vj
from vcon_jax import _fitted


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10, name="head")(nn.relu(nn.Dense(64)(x)))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 32)).astype(np.float32)
  y = rng.integers(0, 10, 64)
  params = MLP().init(jax.random.key(0), x)["params"]
  return x, y, params


def test_output_jump_is_relative_and_shift_invariant():
  z = np.array([[1.0, -1.0, 0.0], [2.0, 0.0, -2.0]])
  assert vj.output_jump(z, z) == 0.0
  assert vj.output_jump(z, z + 5.0) == 0.0  # a softmax ignores a shift of all logits
  assert vj.output_jump(z, 0.5 * z) == pytest.approx(0.5)
  assert vj.output_jump(z, 3.0 * z) == pytest.approx(2.0)
  # trees (a model returning a tuple or a dataclass) add up over their leaves
  assert vj.output_jump((z, z), (z, 0.5 * z)) == pytest.approx(0.5 / np.sqrt(2))


@pytest.mark.parametrize("bad, match", [
    ((np.ones((2, 3)), np.ones((2, 3))), "constant over their last axis"),
    ((np.ones((2, 3)), np.ones((3, 3))), "differ in shape"),
    (((np.ones((2, 3)),), ()), "same model"),
])
def test_output_jump_refuses(bad, match):
  with pytest.raises(ValueError, match=match):
    vj.output_jump(*bad)


def test_rule_ends_and_middle():
  low, high = _fitted.JUMP_LOW, _fitted.JUMP_HIGH
  assert vj.fitted_transition(0.0, 1000) == 0
  assert vj.fitted_transition(low, 1000) == 0
  assert vj.fitted_transition(high, 1000) == 200
  assert vj.fitted_transition(10.0, 1000) == 200
  assert vj.fitted_transition((low + high) / 2, 1000) == 100
  assert vj.fitted_transition(10.0, 1000, max_fraction=0.5) == 500
  # monotone in the jump
  qs = [vj.fitted_transition(j, 977) for j in np.linspace(0, 2, 41)]
  assert qs == sorted(qs)


@pytest.mark.parametrize("args, match", [
    ((-1.0, 100), "jump"), ((float("nan"), 100), "jump"), ((0.7, 0), "total_steps"),
    ((0.7, 100, 1.5), "max_fraction"),
])
def test_rule_refuses_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    vj.fitted_transition(*args)


def test_fitted_vanish_is_linear_vanish_of_q():
  s = vj.fitted_vanish(500, jump=0.4)
  q = vj.fitted_transition(0.4, 500)
  ref = vj.linear_vanish(q)
  counts = np.arange(0, 200)
  np.testing.assert_array_equal(np.asarray(jax.vmap(s)(counts)),
                                np.asarray(jax.vmap(ref)(counts)))
  assert "transition 50 of 500 steps" in s.describe()


def test_step_init_measures_the_jump(setup):
  x, y, params = setup
  batch = {"inputs": x, "labels": y}
  step = vj.make_train_step(MLP(), vj.binarize(), vj.fitted_vanish(100),
                            optimizer=optax.sgd(0.01), example=x)
  with pytest.raises(ValueError, match="batch=first_batch"):
    step.init(params)
  state = step.init(params, batch=batch)
  assert isinstance(step.schedule, vj.FittedVanish) and step.schedule.jump > 0
  # the jump is the output jump of the dense and the exact compressed model
  dense = MLP().apply({"params": params}, x)
  compressed = MLP().apply({"params": step.compressed_params(state)}, x)
  assert step.schedule.jump == pytest.approx(vj.output_jump(dense, compressed), rel=1e-6)
  q = step.schedule.transition_steps
  betas = []
  for _ in range(3):
    state, metrics = step(state, batch)
    betas.append(float(metrics["beta"]))
  expected = [float(vj.linear_vanish(q)(t)) for t in range(3)]
  assert betas == expected
  # the views read the same schedule
  assert state.schedule == step.schedule


def test_small_jump_is_post_shot(setup):
  """A jump below JUMP_LOW gives Q = 0: the step is post-shot, bit for bit."""
  x, y, params = setup
  batch = {"inputs": x, "labels": y}
  transform = vj.quantize(bits=8)
  fitted = vj.make_train_step(MLP(), transform, vj.fitted_vanish(20),
                              optimizer=optax.sgd(0.01), example=x)
  s1 = fitted.init(params, batch=batch)
  assert fitted.schedule.jump < _fitted.JUMP_LOW
  assert fitted.schedule.transition_steps == 0
  post = vj.make_train_step(MLP(), transform, vj.linear_vanish(0),
                            optimizer=optax.sgd(0.01), example=x)
  s2 = post.init(params)
  for _ in range(3):
    s1, _ = fitted(s1, batch)
    s2, _ = post(s2, batch)
  jax.tree.map(np.testing.assert_array_equal, fitted.compressed_params(s1),
               post.compressed_params(s2))


def test_reinit_with_same_batch_fits_the_same_transition(setup):
  x, y, params = setup
  batch = {"inputs": x, "labels": y}
  step = vj.make_train_step(MLP(), vj.prune(sparsity=0.9), vj.fitted_vanish(50),
                            optimizer=optax.sgd(0.01), example=x)
  step.init(params, batch=batch)
  first = step.schedule
  step.init(params, batch=batch)  # as a resumed run does before restoring
  assert step.schedule == first


def test_wrap_optax_needs_the_jump(setup):
  x, _, params = setup
  with pytest.raises(ValueError, match="no jump yet"):
    vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.fitted_vanish(100))
  # measured by hand, as the own-loop guide shows
  probe = vj.wrap_optax(optax.identity(), vj.binarize(), vj.linear_vanish(0))
  cparams = vj.compressed_params(probe.init(params))
  jump = vj.output_jump(MLP().apply({"params": params}, x),
                        MLP().apply({"params": cparams}, x))
  tx = vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.fitted_vanish(100, jump=jump))
  assert tx.init(params) is not None


def test_nnx_module_with_batch_norm():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(32, 64, rngs=rngs)
      self.bn = nnx.BatchNorm(64, rngs=rngs)
      self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.relu(self.bn(self.hidden(x))))

  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 32)).astype(np.float32)
  batch = {"inputs": x, "labels": rng.integers(0, 10, 16)}
  module = Net(nnx.Rngs(0))
  step = vj.make_train_step(module, vj.quantize(bits=2), vj.fitted_vanish(40),
                            optimizer=optax.sgd(0.01), example=x)
  state = step.init(batch=batch)
  assert step.schedule.jump > 0
  state, metrics = step(state, batch)
  assert float(metrics["beta"]) == float(vj.linear_vanish(step.schedule.transition_steps)(0))
