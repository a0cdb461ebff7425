"""vj.discover: the compressible weights and their input axes from one trace of the
model, for Flax Linen, Flax NNX, Equinox and scanned layer stacks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax import _paths
from vcon_experiments.models.lm import CausalLM


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.DenseGeneral((4, 2), axis=-1, name="q")(x)         # (in, heads, head_dim)
    x = nn.DenseGeneral(5, axis=(-2, -1), name="o")(x)        # (heads, head_dim, out)
    return nn.LayerNorm()(x)


def test_linen_conv_and_multi_axis_kernels_get_their_contracted_axes():
  x = jnp.ones((1, 6, 6, 3))
  params = _Linen().init(jax.random.key(0), x)["params"]
  found = vj.discover(lambda p, x: _Linen().apply({"params": p}, x), params, x)
  kinds = {p: (u.kind, u.in_axes) for p, u in found.leaves.items()}
  assert kinds["Conv_0/kernel"] == ("linear", (0, 1, 2))
  assert kinds["q/kernel"] == ("linear", (0,))
  assert kinds["o/kernel"] == ("linear", (0, 1))
  assert {kinds[p][0] for p in ("Conv_0/bias", "q/bias", "LayerNorm_0/scale")} == {
      "elementwise"}


def test_a_gemma_style_lm_compresses_projections_not_its_tied_embedding_or_norms():
  model = CausalLM(257, 16, dim=32, depth=2, heads=4, kv_heads=2, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  found = vj.discover(lambda p, x: nnx.merge(graphdef, p, rest)(x), params,
                      jnp.zeros((2, 16), jnp.int32))
  assert found.leaves["embed/embedding"].kind == "tied"
  assert found.leaves["final_norm/scale"].kind == "elementwise"
  assert len(found.paths("linear")) == 14
  t = vj.prune(0.5, **found.selection())
  chosen = [p for p, leaf in _paths.leaf_paths(params) if t.select(p, leaf)]
  assert sorted(chosen) == sorted(found.paths("linear"))


def test_equinox_out_in_weights_get_a_scale_per_output_row_and_train():
  eqx = pytest.importorskip("equinox")
  mlp = eqx.nn.MLP(6, 3, 8, 2, key=jax.random.key(0))
  params, static = eqx.partition(mlp, eqx.is_array)
  apply = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
  x = jnp.asarray(np.random.RandomState(0).randn(16, 6), jnp.float32)
  found = vj.discover(apply, params, x)
  assert found.leaves["layers/0/weight"].in_axes == (1,)  # (out, in)
  assert found.leaves["layers/0/bias"].kind == "elementwise"
  t = vj.quantize(3, **found.selection())
  c = vj.compress(t, params, t.init(params))
  w, cw = np.asarray(params.layers[0].weight), np.asarray(c.layers[0].weight)
  np.testing.assert_allclose(np.abs(cw).max(1), np.abs(w).max(1), rtol=1e-6)  # per row
  assert all(len(np.unique(row)) <= 7 for row in cw)
  assert np.array_equal(np.asarray(c.layers[0].bias), np.asarray(params.layers[0].bias))

  tx = vj.wrap_optax(optax.adam(1e-2), t, vj.linear_vanish(3))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean(apply(p, x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(5):
    params, opt_state = step(params, opt_state)
  comp = vj.compressed_params(opt_state)
  assert all(len(np.unique(row)) <= 7 for row in np.asarray(comp.layers[1].weight))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(16)(x)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=4)
    return scan()(x, None)[0]


def test_scanned_layer_stacks_are_found_and_refused_in_one_line():
  x = jnp.ones((2, 16))
  params = _Scanned().init(jax.random.key(0), x)["params"]
  found = vj.discover(lambda p, x: _Scanned().apply({"params": p}, x), params, x)
  (name,) = [p for p in found.leaves if p.endswith("Dense_0/kernel")]
  kernel = found.leaves[name]
  assert kernel.kind == "stacked" and kernel.stack_axes == (0,) and kernel.in_axes == (1,)
  with pytest.raises(ValueError) as err:
    found.selection()
  assert "\n" not in str(err.value) and "stack of 4 layers" in str(err.value)
  with pytest.raises(ValueError, match="no linear map"):
    found.selection(skip_stacked=True)


def test_a_param_used_in_a_batched_matmul_is_not_taken_for_a_linear_map():
  params = {"w": jnp.ones((3, 4, 5))}
  found = vj.discover(lambda p, x: jnp.einsum("bhi,hio->bho", x, p["w"]), params,
                      jnp.ones((2, 3, 4)))
  assert found.leaves["w"].kind == "elementwise"  # per-head maps: not one linear map


def test_an_integer_kernel_is_named_as_skipped_and_why():
  with pytest.raises(ValueError, match=r"Not floating, so never compressed: d/kernel \(int8\)"):
    vj.prune(0.5).init({"d": {"kernel": jnp.ones((3, 3), jnp.int8)}})
