"""The train step trains what the user's model would train: NNX randomness per seed and
device, Linen training switches, NNX modes left alone, pmap, evaluation of any batch."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj
from foreign_models import (LinenAttention, LinenConvBNDrop, NNXAttention, NNXConvBNDrop,
                            image_batch, seq_batch)

NNX_MODELS = {"attention": (NNXAttention, seq_batch),
              "conv_bn_dropout": (NNXConvBNDrop, image_batch)}


def _nnx_losses(cls, batch_of, seed=0, init_seed=None, steps=2):
  step = vj.make_train_step(cls(nnx.Rngs(0)), vj.prune(sparsity=0.5), vj.linear_vanish(4),
                            optax.adam(1e-2), seed=seed)
  state = step.init(seed=init_seed)
  losses = []
  for i in range(steps):
    state, m = step(state, batch_of(seed=i))
    losses.append(float(m["loss"]))
  return losses


@pytest.mark.slow
@pytest.mark.parametrize("cls,batch_of", NNX_MODELS.values(), ids=NNX_MODELS.keys())
def test_nnx_dropout_follows_the_seed(cls, batch_of):
  ref = _nnx_losses(cls, batch_of, seed=0)
  assert _nnx_losses(cls, batch_of, seed=0) == ref
  assert _nnx_losses(cls, batch_of, seed=1) != ref
  assert _nnx_losses(cls, batch_of, seed=0, init_seed=10) != ref


_FOUR_DEVICES = textwrap.dedent("""
    import jax, numpy as np, optax
    from flax import nnx
    import vcon_jax as vj
    from foreign_models import {cls}, {batch_of}
    assert jax.device_count() == 4
    def loss(devices, n):
      mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
      step = vj.make_train_step({cls}(nnx.Rngs(0)), vj.identity(), vj.constant(1.0),
                                optax.sgd(0.0), mesh=mesh)
      batch = {batch_of}(1)
      batch = {{k: np.repeat(v, n, 0) for k, v in batch.items()}}  # n equal examples
      return float(step(step.init(), batch)[1]["loss"])
    # Same mask on every device would make four equal examples on four devices give
    # exactly the loss of one example on one device.
    print("LOSSES", loss(1, 1), loss(4, 4))
""")


@pytest.mark.slow
@pytest.mark.parametrize("cls,batch_of", [("NNXAttention", "seq_batch"),
                                          ("NNXConvBNDrop", "image_batch")])
def test_nnx_dropout_differs_per_device_on_four_devices(cls, batch_of):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                      "--xla_cpu_multi_thread_eigen=false",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + sys.path)}
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES.format(cls=cls,
                                                                   batch_of=batch_of)],
                       env=env, capture_output=True, text=True, timeout=1800, check=True)  # hang-only
  one, four = map(float, out.stdout.split("LOSSES")[1].split())
  assert abs(one - four) > 1e-4, (one, four)


@pytest.mark.slow
def test_linen_train_argument_is_passed_for_you():
  model = LinenConvBNDrop()
  batch = image_batch()
  variables = model.init(jax.random.key(0), batch["inputs"], train=False)
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(3),
                            optax.adam(1e-2))  # no train_kwargs
  state = step.init(variables)
  mean0 = np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"])
  state, _ = step(state, batch)
  assert not np.allclose(state.model_state["batch_stats"]["BatchNorm_0"]["mean"], mean0)
  logits, _ = step.evaluate(state, batch)  # evaluation: train=False
  want = model.apply({"params": step.compressed_params(state), **state.model_state},
                     batch["inputs"], train=False)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_linen_deterministic_argument_turns_dropout_on():
  model = LinenAttention()  # __call__(x, deterministic=True): eval mode by default
  batch = seq_batch()
  variables = model.init(jax.random.key(0), batch["inputs"])

  def first_loss(seed, **kw):
    step = vj.make_train_step(model, vj.identity(), vj.constant(1.0), optax.sgd(0.0),
                              seed=seed, **kw)
    return float(step(step.init(variables), batch)[1]["loss"])

  assert first_loss(0) != first_loss(1)  # dropout on, drawn from the seed
  off = {"train_kwargs": {}, "eval_kwargs": {}}  # explicit: no argument, eval mode
  assert first_loss(0, **off) == first_loss(1, **off)


def test_several_training_switches_are_ambiguous():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool, deterministic: bool):
      return nn.Dense(3)(x)

  with pytest.raises(ValueError, match=r"several training switches.*train_kwargs="):
    vj.make_train_step(Net(), vj.binarize(), vj.linear_vanish(2))
  vj.make_train_step(Net(), vj.binarize(), vj.linear_vanish(2),
                     train_kwargs={"train": True, "deterministic": False},
                     eval_kwargs={"train": False, "deterministic": True})


@pytest.mark.parametrize("cls", [NNXConvBNDrop, pytest.param(NNXAttention, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_make_train_step_leaves_the_nnx_mode_alone(cls, mode):
  model = cls(nnx.Rngs(0))
  getattr(model, mode)()
  modes = lambda: [(getattr(m, "deterministic", None), getattr(m, "use_running_average",
                                                                None))
                   for _, m in nnx.iter_modules(model)]
  before = modes()
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(2))
  assert modes() == before and model.drop.deterministic == (mode == "eval")
  step.update_model(step.init())
  assert modes() == before


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 7])
def test_evaluate_without_labels_and_a_partial_batch(n):
  model = LinenConvBNDrop()
  batch = image_batch(8)
  variables = model.init(jax.random.key(0), batch["inputs"], train=False)
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(2))
  state, _ = step(step.init(variables), batch)
  assert step.mesh.size == jax.device_count()
  inputs = image_batch(n, seed=3)["inputs"]
  logits, metrics = step.evaluate(state, {"inputs": inputs})
  assert metrics == {} and logits.shape == (n, 5)
  want = model.apply({"params": step.compressed_params(state), **state.model_state},
                     inputs, train=False)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_replicate_and_unreplicate():
  tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(4)}
  rep = vj.replicate(tree)
  n = jax.local_device_count()
  assert rep["w"].shape == (n, 2, 3) and rep["step"].shape == (n,)
  assert len(rep["w"].sharding.device_set) == n
  jax.tree.map(np.testing.assert_array_equal, vj.unreplicate(rep), tree)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (forced CPU) devices")
def test_pmap_loop_with_replicate():  # the README's recipe covers a Linen model
  model, batch_of, params = NNXConvBNDrop(nnx.Rngs(0)), image_batch, None
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(2),
                            optax.adam(1e-2), axis_name="batch")
  p_step = jax.pmap(step, axis_name="batch")
  state = vj.replicate(step.init(params))
  n = jax.local_device_count()
  for i in range(3):
    batch = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch_of(seed=i))
    state, metrics = p_step(state, batch)
  assert metrics["loss"].shape == (n,) and np.isfinite(metrics["loss"]).all()
  single = vj.unreplicate(state)
  cparams = step.compressed_params(single)
  leaves = jax.tree.leaves(cparams)
  ref = jax.tree.leaves(step.compressed_params(step.init(params)))
  assert [x.shape for x in leaves] == [x.shape for x in ref]
  logits, _ = step.evaluate(single, batch_of(3))
  assert logits.shape == (3, 5)


class _BNNet(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
    return nn.Dense(3)(nn.relu(x))


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (forced CPU) devices")
def test_batchnorm_statistics_are_whole_batch_under_the_data_parallel_step():
  """The step is jax.jit over a mesh (the partitioner does the collectives), so a plain
  BatchNorm normalises with the whole global batch's statistics, as on one device."""
  rng = np.random.RandomState(0)
  batches = [{"inputs": rng.randn(8, 5).astype(np.float32) + np.arange(8)[:, None],
              "labels": rng.randint(0, 3, 8)} for _ in range(4)]

  def losses(axis_name, devices):
    model = _BNNet(axis_name)
    variables = model.init(jax.random.key(0), batches[0]["inputs"], train=False)
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(2),
                              optax.sgd(0.1), mesh=mesh)
    state, out = step.init(variables), []
    for b in batches:
      state, m = step(state, b)
      out.append(float(m["loss"]))
    return out

  one_batch = losses(None, 1)
  np.testing.assert_allclose(losses(None, 2), one_batch, atol=1e-5)
