"""The traced selection as the default: make_train_step(example=...) and vj.reselect."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax import _paths

from test_discover import _Scanned, _scanned_params  # a Linen nn.scan stack of 4 layers


class Gemmaish(nnx.Module):
  """Einsum weights named ``w`` / ``o`` (Gemma's style), a tied table, a norm scale."""

  def __init__(self, rngs):
    k = rngs.params
    self.embedder = nnx.Param(jax.random.normal(k(), (50, 16)))
    self.w = nnx.Param(jax.random.normal(k(), (16, 4, 8)) * 0.1)  # (D, heads, head_dim)
    self.o = nnx.Param(jax.random.normal(k(), (4, 8, 16)) * 0.1)  # (heads, head_dim, D)
    self.scale = nnx.Param(jnp.ones(16))

  def __call__(self, t):
    x = self.embedder[...][t]
    h = jax.nn.gelu(jnp.einsum("btd,dhk->bthk", x, self.w[...]))
    y = jnp.einsum("bthk,hkd->btd", h, self.o[...]) * self.scale[...]
    return y @ self.embedder[...].T


TOKENS = jnp.zeros((2, 5), jnp.int32)


def _lm_loss(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def _selected(transform, params):
  return sorted(p for p, leaf in _paths.leaf_paths(params) if transform.select(p, leaf))


def test_without_an_example_names_select_and_gemma_weights_are_refused():
  step = vj.make_train_step(Gemmaish(nnx.Rngs(0)), vj.quantize(4), vj.linear_vanish(4),
                            optax.adam(1e-3), loss_fn=_lm_loss)
  with pytest.raises(ValueError, match=r"^quantize: cannot tell what o .*Pass example="):
    step.init()


@pytest.mark.parametrize("transform", [vj.quantize(4), vj.prune(0.5, granularity="neuron"),
                                       vj.low_rank(2)], ids=["quantize", "prune", "low_rank"])
def test_an_example_selects_the_linear_maps_with_their_traced_axes(transform):
  model = Gemmaish(nnx.Rngs(0))
  step = vj.make_train_step(model, transform, vj.linear_vanish(4), optax.adam(1e-3),
                            loss_fn=_lm_loss, example=TOKENS)
  state = step.init()
  params = nnx.state(model, nnx.Param).to_pure_dict()
  assert _selected(step.transform, params) == ["o", "w"]  # not the tied table, not the norm
  state, metrics = step(state, {"inputs": TOKENS, "labels": TOKENS})
  assert np.isfinite(float(metrics["loss"]))
  specs = {p: step.transform.describe(p, leaf, state.transform_state)
           for p, leaf in _paths.leaf_paths(params)}
  # w is (D, heads, head_dim) with one input axis; o (heads, head_dim, D): Flax's default
  assert specs["w"][0].in_axes == (0,) and specs["o"][0].in_axes is None


def test_where_and_exclude_still_narrow_and_explicit_axes_are_kept():
  model = Gemmaish(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param).to_pure_dict()
  found = vj.discover(lambda p, t: _apply(model, p, t), params, TOKENS)
  assert _selected(vj.reselect(vj.prune(0.5, where="^w$"), found), params) == ["w"]
  assert _selected(vj.reselect(vj.prune(0.5, exclude="^w$"), found), params) == ["o"]
  chained = vj.reselect(vj.chain(vj.prune(0.5), vj.quantize(8)), found)
  assert _selected(chained, params) == ["o", "w"]
  # whole tensors on request: the trace keeps the linear maps' axes and adds the rest
  explicit = vj.prune(0.5, include_non_kernels=True, where="scale")
  assert _selected(vj.reselect(explicit, found), params) == ["scale"]


def _apply(model, params, tokens):
  graph, state = nnx.split(model, nnx.Param)
  state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graph, state)(tokens)


def test_linen_scanned_stack_gets_a_threshold_per_layer_from_the_example():
  params, found = _scanned_params()  # layers of very different scales
  step = vj.make_train_step(_Scanned(), vj.prune(0.9), vj.linear_vanish(0),
                            optax.sgd(0.0), example=jnp.ones((2, 16)))
  c = step.compressed_params(step.init(params))
  (name,) = [p for p in found.leaves if p.endswith("Dense_0/kernel")]
  stack = np.asarray(dict(_paths.leaf_paths(c))[name])
  for layer in range(4):  # 90 % of every layer (one threshold for all empties layer 0)
    assert np.mean(stack[layer] == 0) == pytest.approx(0.9, abs=0.01)


def test_a_linen_example_the_model_cannot_take_is_a_clear_error():
  with pytest.raises(ValueError, match="init does not run on the example"):
    vj.make_train_step(_Scanned(), vj.prune(0.5), vj.linear_vanish(4), optax.adam(1e-3),
                       example=jnp.ones((2, 7)))


def test_wrap_optax_traces_with_apply_fn_params_example():
  """A wrap_optax loop on Gemma-style einsum weights: apply_fn/params/example re-select
  the quantiser onto w and o (traced axes), the tied table and the norm stay dense, and the
  loop's params at beta = 0 are the compressed ones."""
  model = Gemmaish(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = params.to_pure_dict()
  apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
  with pytest.raises(ValueError, match="together"):
    vj.wrap_optax(optax.sgd(0.1), vj.quantize(4), vj.linear_vanish(0), example=TOKENS)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  tx = vj.wrap_optax(optax.sgd(0.1), vj.quantize(4), vj.linear_vanish(0),
                     apply_fn=apply_fn, params=shapes, example=TOKENS)
  opt_state = tx.init(params)
  c = vj.compressed_params(opt_state)
  for name, fan_in in (("w", 16), ("o", 32)):  # traced input axes: (0,) and (0, 1)
    mat = np.asarray(c[name]).reshape(fan_in, -1)
    assert max(len(np.unique(col)) for col in mat.T) <= 15  # 4-bit levels per output unit
  for name in ("embedder", "scale"):
    np.testing.assert_array_equal(c[name], params[name])
  p = vj.blended_params(opt_state)
  grads = jax.grad(lambda p: apply_fn(p, TOKENS).sum())(p)
  updates, opt_state = tx.update(grads, opt_state, p)
  p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(p["w"], vj.compressed_params(opt_state)["w"], rtol=1e-6)


def test_summary_shows_what_each_leaf_is_after_a_trace(tmp_path):
  model = Gemmaish(nnx.Rngs(0))
  step = vj.make_train_step(model, vj.quantize(4), vj.linear_vanish(0), optax.adam(1e-3),
                            loss_fn=_lm_loss, example=TOKENS)
  state = step.init()
  rows = vj.export(step, state, tmp_path / "m.npz")
  roles = {r["name"]: r["role"] for r in rows}
  assert roles == {"embedder": "tied embedding", "w": "linear in (0,) out (1, 2)",
                   "o": "linear in (0, 1) out (2,)", "scale": "elementwise"}
  table = vj.summary(tmp_path / "m.npz", print_fn=None).table()
  assert "role" in table.splitlines()[0] and "linear in (0, 1) out (2,)" in table
  plain = vj.make_train_step(model, vj.quantize(4, where="w|o", include_non_kernels=True,
                                                in_axes={"w": 1, "o": 2}),
                             vj.linear_vanish(0), optax.adam(1e-3), loss_fn=_lm_loss)
  assert "role" not in vj.summary(plain, plain.init(), print_fn=None).table().splitlines()[0]
