"""Data parallelism on 2 forced CPU devices: jit over a 'data' mesh and the pmap step."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import vcon_jax as vj


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


def _setup(**kw):
  model = MLP()
  x = np.random.RandomState(0).randn(16, 10).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  step = vj.make_train_step(model, vj.prune(sparsity=0.8), vj.linear_vanish(4),
                            optax.sgd(0.1), **kw)
  return params, step


def _batches(n=5):
  rng = np.random.RandomState(1)
  return [{"inputs": rng.randn(16, 10).astype(np.float32),
           "labels": rng.randint(0, 4, 16)} for _ in range(n)]


def _losses(step, state, batches, call=None):
  out = []
  for b in batches:
    state, m = (call or step)(state, b)
    out.append(float(np.asarray(m["loss"]).reshape(-1)[0]))
  return out


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (forced CPU) devices")
def test_jit_mesh_and_pmap_match_single_device():
  single_mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  params, single = _setup(mesh=single_mesh)
  ref = _losses(single, single.init(params), _batches())

  params, multi = _setup()  # default: all devices on the 'data' axis
  assert multi.mesh.size == 2
  np.testing.assert_allclose(_losses(multi, multi.init(params), _batches()), ref, atol=1e-5)

  params, pstep = _setup(axis_name="batch")
  p_step = jax.pmap(pstep, axis_name="batch")
  state = jax.tree.map(lambda x: np.stack([np.asarray(x)] * 2), pstep.init(params))
  shard = lambda b: jax.tree.map(lambda x: x.reshape(2, -1, *x.shape[1:]), b)
  got = _losses(pstep, state, [shard(b) for b in _batches()], call=p_step)
  np.testing.assert_allclose(got, ref, atol=1e-5)
