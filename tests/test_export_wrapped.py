"""Every training path exports: the opt_state of a wrap_optax loop (plain, inside
optax.chain / MultiSteps, in nnx.Optimizer), Linen and NNX, with BatchNorm statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj

TRANSFORMS = {
    "prune": lambda: vj.prune(sparsity=0.8),
    "quantize4_g8": lambda: vj.quantize(bits=4, group_size=8),
    "binarize": vj.binarize,
    "low_rank": lambda: vj.low_rank(rank=3),
    "prune+quantize": lambda: vj.chain(vj.prune(sparsity=0.5), vj.quantize(bits=4)),
}
X = np.random.RandomState(0).randn(16, 16).astype(np.float32)
Y = np.random.RandomState(1).randint(0, 4, 16)


class _NNX(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 24, rngs=rngs)
    self.bn = nnx.BatchNorm(24, rngs=rngs)
    self.fc2 = nnx.Linear(24, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.bn(self.fc1(x))))


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(24)(x))
    return nn.Dense(4)(nn.relu(h))


def _ce(logits):
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def _assert_equal_trees(a, b, exact=True):
  """Bit for bit; low-rank factors' product to float tolerance (README: export)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("prune")
                                  else n for n in TRANSFORMS])
def test_nnx_optimizer_loop_exports_weights_and_batchnorm_statistics(name, tmp_path):
  model = _NNX(nnx.Rngs(0))
  opt = nnx.Optimizer(model, vj.wrap_optax(optax.adam(1e-2), TRANSFORMS[name](),
                                           vj.linear_vanish(3)), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: _ce(m(X)))(model)
    opt.update(model, grads)

  for _ in range(6):
    step(model, opt)
  rows = vj.export(opt.opt_state, tmp_path / "m.npz", model=model)
  assert [r for r in rows if r["transform"]], rows
  compact = vj.load_compressed(tmp_path / "m.npz")
  _assert_equal_trees(compact.params(), vj.compressed_params(opt.opt_state),
                      exact=name != "low_rank")

  fresh = compact.update(_NNX(nnx.Rngs(5)))  # weights and statistics, one call
  fresh.eval()
  reference = nnx.clone(model)
  nnx.update(reference, vj.compressed_params(opt.opt_state))
  reference.eval()
  np.testing.assert_allclose(np.asarray(fresh(X)), np.asarray(reference(X)),
                             rtol=1e-5, atol=1e-6)
  # the running statistics came from the trained module, not the fresh one's init
  np.testing.assert_array_equal(np.asarray(fresh.bn.mean[...]),
                                np.asarray(model.bn.mean[...]))
  totals = vj.summary(opt.opt_state, model=model, print_fn=None).totals
  assert {k: v for k, v in totals.items() if k != "file_bytes"} == {
      k: v for k, v in rows.totals.items() if k != "file_bytes"}


@pytest.mark.parametrize("wrap", ["plain", "chain", "multisteps"])
def test_linen_wrap_optax_loop_exports_with_its_batch_stats(wrap, tmp_path):
  model = _Linen()
  variables = model.init(jax.random.key(0), X)
  params, stats = variables["params"], variables["batch_stats"]
  tx = vj.wrap_optax(optax.adam(1e-2), vj.quantize(bits=4), vj.linear_vanish(3))
  tx = {"plain": tx, "chain": optax.chain(optax.clip_by_global_norm(1.0), tx),
        "multisteps": optax.MultiSteps(tx, 2)}[wrap]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, X, train=True,
                                mutable=["batch_stats"])
      return _ce(logits), new["batch_stats"]
    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  for _ in range(8):
    params, stats, opt_state = step(params, stats, opt_state)
  vj.export(opt_state, tmp_path / "m.npz", model=model, model_state={"batch_stats": stats})
  compact = vj.load_compressed(tmp_path / "m.npz")
  cparams = vj.compressed_params(opt_state)
  _assert_equal_trees(compact.params(), cparams)
  _assert_equal_trees(compact.model_state()["batch_stats"], stats)
  want = model.apply({"params": cparams, "batch_stats": stats}, X)
  np.testing.assert_allclose(np.asarray(compact.apply(model, X)), np.asarray(want),
                             rtol=1e-5, atol=1e-6)


def test_export_of_an_opt_state_says_what_it_needs():
  tx = vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.linear_vanish(2))
  opt_state = tx.init({"dense": {"kernel": jnp.ones((4, 4))}})
  with pytest.raises(ValueError, match="need the model: pass model="):
    vj.export(opt_state, "/tmp/never_written.npz")
  with pytest.raises(ValueError, match="opt_state of a vj.wrap_optax loop"):
    vj.export(optax.sgd(0.1).init({"k": jnp.ones(2)}), "/tmp/never_written.npz",
              model=nn.Dense(4))
  with pytest.raises(ValueError, match=r"\(state, path, model=...\)"):
    vj.export(opt_state, "/tmp/a.npz", "/tmp/b.npz", model=nn.Dense(4))
