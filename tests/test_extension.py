"""The public rule contract: a compression defined outside the package (ext_ternary.py,
with ``vj.LeafRule`` and ``vj.leafwise`` only) trains, wraps, exports and summarises like
a built-in, with no change to the library."""

import doctest

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import ext_ternary
import vcon_jax as vj

STEPS, TRANSITION = 8, 5  # three steps at beta = 0 after the transition
TERNARY = ("Dense_0/kernel", "Dense_1/kernel")  # the head (Dense_2) stays dense


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(5)(x)


def _batches():
  rng = np.random.RandomState(0)
  return [{"inputs": rng.randn(16, 12).astype(np.float32),
           "labels": rng.randint(0, 5, 16)} for _ in range(STEPS)]


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _own_loop(model, params, x, batches, read_back):
  """A plain jitted loop with vj.wrap_optax. ``read_back``: the next step's params are
  ``vj.blended_params(opt_state)`` (the weights the wrapper holds for the model) rather
  than ``optax.apply_updates``' ``params + (target - params)``, which lands within a
  float32 rounding of them."""
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  tx = vj.wrap_optax(optax.adam(1e-2), ext_ternary.ternary(), vj.linear_vanish(TRANSITION),
                     apply_fn=apply, params=params, example=x)

  @jax.jit
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      logits = apply(p, batch["inputs"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    if read_back:
      return vj.blended_params(opt_state), opt_state
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for batch in batches:
    params, opt_state = train_step(params, opt_state, batch)
  return params, opt_state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The same training through make_train_step and through wrap_optax (both loops)."""
  model, batches = MLP(), _batches()
  x = batches[0]["inputs"]
  params = model.init(jax.random.key(0), x)["params"]
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  step = vj.make_train_step(model, ext_ternary.ternary(), vj.linear_vanish(TRANSITION),
                            optax.adam(1e-2), example=x, parallel=vj.Parallel(mesh=mesh))
  state = step.init(params)
  for batch in batches:
    state, metrics = step(state, batch)
  assert float(metrics["beta"]) == 0.0
  return {"model": model, "x": x, "step": step, "state": state,
          "read_back": _own_loop(model, params, x, batches, read_back=True),
          "plain": _own_loop(model, params, x, batches, read_back=False),
          "dir": tmp_path_factory.mktemp("ternary")}


def test_the_extension_module_examples_run():
  result = doctest.testmod(ext_ternary, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted and not result.failed


def test_train_step_and_wrap_optax_give_bit_identical_ternary_weights(trained):
  by_step = _flat(trained["step"].compressed_params(trained["state"]))
  _, opt_state = trained["read_back"]
  by_wrapper = _flat(vj.compressed_params(opt_state))
  assert by_step.keys() == by_wrapper.keys()
  for name, value in by_step.items():
    np.testing.assert_array_equal(by_wrapper[name], value, err_msg=name)
  for name in TERNARY:
    kernel = by_step[name]
    for unit in kernel.T:  # {-a, 0, +a} per output unit
      assert set(np.unique(np.abs(unit))) <= {0.0, np.abs(unit).max()}
    assert 0 < np.count_nonzero(kernel) < kernel.size
  head = by_step["Dense_2/kernel"]
  assert len(np.unique(head)) > 3 * head.shape[1]  # the output layer stays dense


def test_a_plain_apply_updates_loop_follows_to_float_rounding(trained):
  by_step = _flat(trained["step"].compressed_params(trained["state"]))
  final, opt_state = trained["plain"]
  by_wrapper = _flat(vj.compressed_params(opt_state))
  for name, value in by_step.items():
    np.testing.assert_allclose(by_wrapper[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    if name in TERNARY:  # the same weights kept
      np.testing.assert_array_equal(by_wrapper[name] != 0, value != 0, err_msg=name)
  # after the transition the model's own params are the ternary weights (to rounding)
  for name, value in _flat(final).items():
    np.testing.assert_allclose(value, by_wrapper[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("source", ["step", "wrapper"])
def test_export_reproduces_the_compressed_values_and_logits(trained, source):
  model, x = trained["model"], trained["x"]
  if source == "step":
    state = trained["state"]
    cparams = trained["step"].compressed_params(state)
  else:
    state = trained["read_back"][1]
    cparams = vj.compressed_params(state)
  path = trained["dir"] / f"{source}.npz"
  rows = vj.export(state, path, model=model)
  loaded = vj.load_compressed(path)
  got, want = _flat(loaded.params()), _flat(cparams)
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  reference = jax.jit(model.apply)({"params": cparams}, x)
  np.testing.assert_array_equal(loaded.apply(model, x, decode="once"), reference)
  stored = {r["name"]: r for r in rows if r["transform"]}
  assert sorted(stored) == list(TERNARY)
  for name in TERNARY:  # at most what the spec promises: 2-bit codes, a scale per unit
    fan_in, fan_out = want[name].shape
    assert stored[name]["compressed_bytes"] <= fan_in * fan_out * 2 // 8 + 4 * fan_out


def test_summary_lists_the_leaves_with_the_new_transform(trained):
  summaries = [vj.summary(trained["state"], model=trained["model"], print_fn=None),
               vj.summary(trained["read_back"][1], model=trained["model"], print_fn=None)]
  for rows in summaries:
    assert sorted(r["name"] for r in rows if r["transform"] == "ternary") == list(TERNARY)
    assert all(not r["transform"] for r in rows if r["name"] not in TERNARY)
  assert summaries[0].table().count(" ternary ") == len(TERNARY)


def test_a_bad_argument_is_refused_when_the_factory_is_called():
  with pytest.raises(ValueError, match="threshold"):
    ext_ternary.ternary(threshold=-1.0)
