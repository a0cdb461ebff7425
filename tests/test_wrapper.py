"""vj.wrap_optax: VCON in the user's own loop follows make_train_step's trajectory."""

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
    "binarize": vj.binarize,
    "quantize": lambda: vj.quantize(bits=3),
    "low_rank": lambda: vj.low_rank(rank=3),
    "chain": lambda: vj.chain(vj.prune(sparsity=0.5), vj.quantize(bits=4)),
}
# the loops with prune (and the chain holding it) are the slow ones: the fast tier skips them
LOOP_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in ("prune", "chain") else n
              for n in TRANSFORMS]
STEPS, Q = 50, 20


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(nn.relu(nn.Dense(16)(x)))


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(12, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def _batches(n=STEPS):
  rng = np.random.RandomState(0)
  return [{"inputs": rng.randn(16, 12).astype(np.float32),
           "labels": rng.randint(0, 5, 16)} for _ in range(n)]


def _own_loop(apply, params, tx, batches):
  """A Flax-examples style loop: the user's jitted train_step, unchanged but for tx."""
  @jax.jit
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      logits = apply(p, batch["inputs"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for batch in batches:
    params, opt_state, loss = train_step(params, opt_state, batch)
    losses.append(float(loss))
  return params, opt_state, losses


def _step_losses(step, state, batches):
  losses = []
  for batch in batches:
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return state, losses


def _one_device():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


@pytest.mark.parametrize("name", LOOP_NAMES)
def test_linen_own_loop_matches_make_train_step(name):
  model, batches = LinenMLP(), _batches()
  params = model.init(jax.random.key(0), batches[0]["inputs"])["params"]
  step = vj.make_train_step(model, TRANSFORMS[name](), vj.linear_vanish(Q),
                            optax.adam(1e-2), mesh=_one_device())
  state, want = _step_losses(step, step.init(params), batches)
  tx = vj.wrap_optax(optax.adam(1e-2), TRANSFORMS[name](), vj.linear_vanish(Q))
  apply = lambda p, x: model.apply({"params": p}, x)
  final, opt_state, got = _own_loop(apply, params, tx, batches)
  np.testing.assert_allclose(got, want, atol=1e-5)
  cparams = vj.compressed_params(opt_state)
  assert jax.tree.structure(cparams) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               cparams, step.compressed_params(state))
  # after the transition the model's own params are the compressed weights (to rounding)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), final, cparams)
  if name == "binarize":
    for layer in ("Dense_0", "Dense_1"):
      vals = np.unique(np.asarray(cparams[layer]["kernel"]))
      assert len(vals) == 2 and vals[0] == -vals[1]


@pytest.mark.parametrize("name", LOOP_NAMES)
def test_nnx_own_loop_matches_make_train_step(name):
  batches = _batches()
  model = NNXMLP(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step = vj.make_train_step(NNXMLP(nnx.Rngs(0)), TRANSFORMS[name](), vj.linear_vanish(Q),
                            optax.adam(1e-2), mesh=_one_device())
  _, want = _step_losses(step, step.init(), batches)
  tx = vj.wrap_optax(optax.adam(1e-2), TRANSFORMS[name](), vj.linear_vanish(Q))
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  _, opt_state, got = _own_loop(apply, params, tx, batches)
  np.testing.assert_allclose(got, want, atol=1e-5)
  cparams = vj.compressed_params(opt_state)
  assert jax.tree.structure(cparams) == jax.tree.structure(params)
  if name == "binarize":
    assert len(np.unique(np.asarray(cparams["fc1"]["kernel"][...]))) == 2


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "chain" else n
                                  for n in TRANSFORMS])
def test_nnx_optimizer_with_the_wrapper(name):
  # low rank crashed at the second update: nnx.Optimizer writes its state back through
  # nnx.state, which turned the WithState nodes of the inner state into nnx.State
  model = NNXMLP(nnx.Rngs(0))
  tx = vj.wrap_optax(optax.adam(1e-2), TRANSFORMS[name](), vj.linear_vanish(3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    def loss_fn(model):
      logits = model(batch["inputs"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  for batch in _batches(5):
    train_step(model, optimizer, batch)
  cparams = vj.compressed_params(optimizer.opt_state)
  for layer in ("fc1", "fc2"):
    kernel = np.asarray(cparams[layer]["kernel"])
    if name == "binarize":
      assert len(np.unique(kernel)) == 2
    np.testing.assert_allclose(getattr(model, layer).kernel[...], kernel, atol=1e-6)


def _linen_params():
  model = LinenMLP()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]


def test_multi_transform_labels_keyed_by_the_params_tree():
  model, params = _linen_params()
  labels = {"Dense_0": {"kernel": "frozen", "bias": "train"},
            "Dense_1": {"kernel": "train", "bias": "train"}}
  inner = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()},
                                labels)
  tx = vj.wrap_optax(inner, vj.low_rank(rank=3), vj.linear_vanish(4))
  apply = lambda p, x: model.apply({"params": p}, x)
  _, opt_state, _ = _own_loop(apply, params, tx, _batches(6))
  state0, state = tx.init(params), vj.ops.vcon_state(opt_state)
  np.testing.assert_array_equal(state.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  assert not np.allclose(state.params["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
  factors0, factors = state0.transform_state.trainable, state.transform_state.trainable
  for k in ("a", "b"):  # the frozen kernel's low-rank factors are frozen with it
    np.testing.assert_array_equal(factors["Dense_0/kernel"][k], factors0["Dense_0/kernel"][k])
    assert not np.allclose(factors["Dense_1/kernel"][k], factors0["Dense_1/kernel"][k])


@pytest.mark.parametrize("transform", [pytest.param(vj.prune(sparsity=0.5), marks=pytest.mark.slow),
                                       vj.low_rank(rank=3)], ids=["prune", "low_rank"])
def test_adamw_mask_keyed_by_the_params_tree(transform):
  _, params = _linen_params()
  mask = {"Dense_0": {"kernel": True, "bias": False},
          "Dense_1": {"kernel": False, "bias": False}}
  tx = vj.wrap_optax(optax.adamw(0.1, weight_decay=0.5, mask=mask), transform,
                     vj.linear_vanish(4))
  opt_state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)  # only the weight decay moves anything
  updates, opt_state = tx.update(zero, opt_state, params)
  dense = vj.dense_params(opt_state)
  np.testing.assert_allclose(dense["Dense_0"]["kernel"], params["Dense_0"]["kernel"] * 0.95,
                             rtol=1e-6)
  for path in (("Dense_0", "bias"), ("Dense_1", "kernel"), ("Dense_1", "bias")):
    np.testing.assert_array_equal(dense[path[0]][path[1]], params[path[0]][path[1]])
  trainable = opt_state.transform_state.trainable
  if trainable:  # decayed with their kernel
    assert not np.allclose(trainable["Dense_0/kernel"]["a"],
                           tx.init(params).transform_state.trainable["Dense_0/kernel"]["a"])


@pytest.mark.slow
def test_multisteps_around_the_wrapper_counts_optimiser_steps():
  model, params = _linen_params()
  apply = lambda p, x: model.apply({"params": p}, x)
  batches = _batches(2)
  twice = [b for b in batches for _ in range(2)]  # each batch for 2 micro-steps
  acc = optax.MultiSteps(vj.wrap_optax(optax.sgd(0.1), vj.prune(sparsity=0.5),
                                       vj.linear_vanish(2)), every_k_schedule=2)
  _, acc_state, _ = _own_loop(apply, params, acc, twice)
  plain = vj.wrap_optax(optax.sgd(0.1), vj.prune(sparsity=0.5), vj.linear_vanish(2))
  _, plain_state, _ = _own_loop(apply, params, plain, batches)
  assert int(vj.ops.vcon_state(acc_state).count) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               vj.compressed_params(acc_state), vj.compressed_params(plain_state))


@pytest.mark.slow
def test_checkpoint_and_resume_the_wrapper_state(tmp_path):
  model, params = _linen_params()
  apply = lambda p, x: model.apply({"params": p}, x)
  batches = _batches(6)
  make = lambda: vj.wrap_optax(optax.adam(1e-2), vj.chain(vj.prune(sparsity=0.5),
                                                          vj.low_rank(rank=3)),
                               vj.linear_vanish(4))
  full, full_state, _ = _own_loop(apply, params, make(), batches)
  half, half_state, _ = _own_loop(apply, params, make(), batches[:3])
  vj.save({"params": half, "opt_state": half_state}, tmp_path / "ck", step=3)
  tx = make()
  target = {"params": params, "opt_state": tx.init(params)}
  restored = vj.restore(tmp_path / "ck", target)
  assert int(vj.ops.vcon_state(restored["opt_state"]).count) == 3

  @jax.jit
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      logits = apply(p, batch["inputs"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  p, s = restored["params"], restored["opt_state"]
  for batch in batches[3:]:
    p, s = train_step(p, s, batch)
  jax.tree.map(np.testing.assert_array_equal, p, full)
  jax.tree.map(np.testing.assert_array_equal, vj.compressed_params(s),
               vj.compressed_params(full_state))


def test_post_shot_starts_from_the_blended_params():
  _, params = _linen_params()
  tx = vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.linear_vanish(0))
  opt_state = tx.init(params)
  start = vj.blended_params(opt_state)
  jax.tree.map(np.testing.assert_array_equal, start, vj.compressed_params(opt_state))


@pytest.mark.parametrize("call,match", [
    (lambda: vj.wrap_optax("adam", vj.binarize(), vj.linear_vanish(2)),
     "optax.GradientTransformation"),
    (lambda: vj.wrap_optax(optax.sgd(0.1), "prune", vj.linear_vanish(2)),
     "vcon_jax Transform"),
    (lambda: vj.wrap_optax(optax.sgd(0.1), vj.binarize(), 0.5), "schedule must be callable"),
    (lambda: vj.compressed_params({"w": jnp.ones(2)}), "exactly one vj.wrap_optax state"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_update_needs_params():
  _, params = _linen_params()
  tx = vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.linear_vanish(2))
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (forced CPU) devices")
def test_params_split_over_explicit_mesh_axes_are_refused():
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((1, 2), ("data", "model"), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  params = {"kernel": jax.device_put(jnp.ones((4, 4)),
                                     NamedSharding(mesh, P(None, "model")))}
  tx = vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.linear_vanish(2))
  with pytest.raises(ValueError, match="needs Auto axes"):
    tx.init(params)


@pytest.mark.parametrize("transform", [
    lambda: vj.chain(vj.prune(sparsity=0.5, update_every=2), vj.quantize(bits=4)),
    lambda: vj.chain(vj.prune(sparsity=0.5), vj.low_rank(rank=2)),  # NumPy SVD: eager
], ids=["stored_mask_chain", "prune_then_low_rank"])
def test_init_compiled_or_eager_gives_the_eager_transform_state(transform):
  params = {"kernel": jax.random.normal(jax.random.key(0), (8, 6)), "bias": jnp.ones(6)}
  t = transform()
  got = vj.wrap_optax(optax.sgd(0.1), t, vj.linear_vanish(4)).init(params).transform_state
  want = t.init(params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
