"""The train step: one trace, exact compressed view, Linen/NNX, state, bad batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(5)(x)


class LinenBNDropout(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(5)(x)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(12, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.fc2 = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def _batch(n=16, d=12, seed=0):
  rng = np.random.RandomState(seed)
  return {"inputs": rng.randn(n, d).astype(np.float32), "labels": (np.arange(n) % 5)}


def _linen_step(transform, q=4, **kw):
  model = LinenMLP()
  params = model.init(jax.random.key(0), _batch()["inputs"])["params"]
  step = vj.make_train_step(model, transform, vj.linear_vanish(q), optax.adam(1e-2), **kw)
  return model, params, step


def _counting_loss():
  """The default loss plus a count of how often the step traced it (once per compile)."""
  traces = []

  def loss_fn(logits, batch):
    traces.append(1)
    return vj.softmax_cross_entropy(logits, batch)
  return loss_fn, traces


def test_traced_once_while_beta_changes():
  loss_fn, traces = _counting_loss()
  _, params, step = _linen_step(vj.prune(sparsity=0.8), q=6, loss_fn=loss_fn)
  state = step.init(params)
  betas = []
  for i in range(10):
    state, m = step(state, _batch(seed=i))
    betas.append(float(m["beta"]))
    if i == 0:
      first = len(traces)  # the jit trace, plus the abstract pre-jit check of the loss
  assert len(traces) == first <= 2  # nothing traced again while beta changes
  assert len(step._jitted) == 1  # pylint: disable=protected-access  one compiled step
  np.testing.assert_allclose(betas[:7], 1 - np.arange(7) / 6, atol=1e-7)
  assert betas[6:] == [0.0] * 4
  assert {"loss", "beta", "accuracy", "grad_norm"} <= set(m)


@pytest.mark.parametrize("transform", [
    pytest.param(vj.prune(sparsity=0.8), marks=pytest.mark.slow), vj.binarize(),
    vj.quantize(bits=3), vj.low_rank(rank=3),
    pytest.param(vj.chain(vj.prune(sparsity=0.5), vj.quantize(bits=4)), marks=pytest.mark.slow)],
    ids=lambda t: "t")
def test_compressed_params_exact(transform):
  model, params, step = _linen_step(transform, q=3)
  state = step.init(params)
  for i in range(5):
    state, _ = step(state, _batch(seed=i))
  cparams = step.compressed_params(state)
  assert jax.tree.structure(cparams) == jax.tree.structure(params)
  batch = _batch(seed=9)
  plain = model.apply({"params": cparams}, batch["inputs"])
  logits, metrics = step.evaluate(state, batch)
  np.testing.assert_allclose(plain, logits, rtol=1e-6, atol=1e-6)
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_binarized_layer_holds_exactly_two_values():
  _, params, step = _linen_step(vj.binarize(), q=2)
  state = step.init(params)
  for i in range(4):
    state, _ = step(state, _batch(seed=i))
  k = np.asarray(step.compressed_params(state)["Dense_0"]["kernel"])
  vals = np.unique(k)
  assert len(vals) == 2 and vals[0] == -vals[1]


@pytest.mark.slow
def test_pruned_weights_keep_learning():
  _, params, step = _linen_step(vj.prune(sparsity=0.9), q=0)
  state = step.init(params)
  mask0 = np.asarray(step.compressed_params(state)["Dense_0"]["kernel"]) != 0
  dense0 = np.asarray(state.params["Dense_0"]["kernel"])
  for i in range(5):
    state, _ = step(state, _batch(seed=i))
  moved = np.asarray(state.params["Dense_0"]["kernel"]) != dense0
  assert moved[~mask0].any(), "straight-through: pruned weights receive gradients"


@pytest.mark.slow
def test_linen_batchnorm_and_dropout():
  model = LinenBNDropout()
  x = _batch()["inputs"]
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                         train=False)
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(3),
                            optax.adam(1e-2), train_kwargs={"train": True},
                            eval_kwargs={"train": False})
  state = step.init(variables)
  stats0 = np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"])
  state, m = step(state, _batch())
  assert np.isfinite(float(m["loss"]))
  assert not np.allclose(state.model_state["batch_stats"]["BatchNorm_0"]["mean"], stats0)
  logits, _ = step.evaluate(state, _batch())
  cp = step.compressed_params(state)
  plain = model.apply({"params": cp, **state.model_state}, _batch()["inputs"], train=False)
  np.testing.assert_allclose(plain, logits, rtol=1e-6, atol=1e-6)


def test_nnx_model_end_to_end():
  model = NNXNet(nnx.Rngs(0))
  loss_fn, traces = _counting_loss()
  step = vj.make_train_step(model, vj.low_rank(rank=4), vj.linear_vanish(3),
                            optax.adam(1e-2), loss_fn=loss_fn)
  state = step.init()  # the module's own Params
  for i in range(4):
    state, m = step(state, _batch(seed=i))
    if i == 0:
      first = len(traces)  # the jit trace, plus the abstract pre-jit check of the loss
  assert np.isfinite(float(m["loss"])) and len(traces) == first <= 2
  assert len(step._jitted) == 1  # pylint: disable=protected-access
  cparams = step.compressed_params(state)
  assert isinstance(cparams, nnx.State)
  nnx.update(model, cparams)
  nnx.update(model, nnx.State(jax.tree.map(
      lambda x: x, {"bn": {"mean": state.model_state["bn"]["mean"],
                           "var": state.model_state["bn"]["var"]}})))
  model.eval()
  batch = _batch(seed=7)
  logits, _ = step.evaluate(state, batch)
  np.testing.assert_allclose(model(batch["inputs"]), logits, rtol=1e-5, atol=1e-5)


def test_custom_loss_and_distillation():
  def loss_fn(logits, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"mean_logit": logits.mean()}

  _, params, step = _linen_step(vj.binarize(), loss_fn=loss_fn, distill_weight=0.5)
  state = step.init(params)
  state, m = step(state, _batch())
  assert {"mean_logit", "distill_loss", "task_loss"} <= set(m)
  assert float(m["distill_loss"]) >= -1e-6


def test_step_is_deterministic():
  _, params, step = _linen_step(vj.prune(sparsity=0.7))
  runs = []
  for _ in range(2):
    state = step.init(params)
    for i in range(3):
      state, _ = step(state, _batch(seed=i))
    runs.append(jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, *runs)


@pytest.mark.parametrize("batch,match", [
    ({"x": np.zeros((4, 12))}, "missing key"),
    ({"inputs": np.zeros((4, 12)), "labels": np.zeros(3, int)}, "same leading"),
    ({"inputs": np.zeros((3, 12)), "labels": np.zeros(3, int)}, "divisible by the number"),
    ([1, 2], "batch must be a dict"),
])
def test_bad_batches(batch, match):
  _, params, step = _linen_step(vj.binarize())
  state = step.init(params)
  with pytest.raises(ValueError, match=match):
    step(state, batch)


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": 0.5}, "schedule must be callable"),
    ({"schedule": lambda c: jnp.ones(3)}, "scalar beta"),
    ({"optimizer": "adam"}, "optax.GradientTransformation"),
    ({"transform": "prune"}, "transform must be a vcon_jax Transform"),
    ({"model": object()}, "flax.linen.Module or a flax.nnx.Module"),
    ({"distill_weight": 2.0}, "distill_weight"),
])
def test_bad_step_arguments(kwargs, match):
  args = {"model": LinenMLP(), "transform": vj.binarize(),
          "schedule": vj.linear_vanish(3), "optimizer": optax.adam(1e-3)}
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    vj.make_train_step(args.pop("model"), args.pop("transform"), args.pop("schedule"),
                       **args)


@pytest.mark.slow
def test_distill_teacher_is_the_frozen_initial_dense_model(tmp_path):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

  model = Net()
  x = np.random.RandomState(0).randn(8, 5).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(2),
                            optax.adam(1e-2), distill_weight=0.5)
  state = step.init(params)
  for _ in range(3):
    state, m = step(state, {"inputs": x, "labels": np.zeros(8, np.int32)})
  assert "distill_loss" in m and np.isfinite(float(m["distill_loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.teacher), params)
  vj.save(state, tmp_path / "ck")
  restored = vj.restore(tmp_path / "ck", step.init(params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.teacher), params)
  with pytest.raises(ValueError, match="distill_teacher"):
    vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(2),
                       distill_teacher="best")


@pytest.mark.slow
def test_update_model_writes_compressed_weights_and_batchnorm_stats():
  from vcon_experiments.models import get_model  # pylint: disable=import-outside-toplevel
  model = get_model("cnn", features=(4, 8), hidden=8, rngs=nnx.Rngs(0))
  x = np.random.RandomState(0).rand(8, 28, 28, 1).astype(np.float32)
  y = np.arange(8) % 10
  step = vj.make_train_step(model, vj.binarize(), vj.linear_vanish(2), optax.adam(1e-2))
  state = step.init()
  for _ in range(3):
    state, _ = step(state, {"inputs": x, "labels": y})
  want, _ = step.evaluate(state, {"inputs": x, "labels": y})
  module = step.update_model(state)
  module.eval()
  np.testing.assert_allclose(np.asarray(module(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
  kernel = np.asarray(module.fc.kernel.value)
  assert len(np.unique(kernel)) == 2  # exactly +-scale
