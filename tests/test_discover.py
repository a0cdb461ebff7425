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


@pytest.mark.slow
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


def _scanned_params():
  x = jnp.ones((2, 16))
  params = _Scanned().init(jax.random.key(0), x)["params"]
  # trained layers of very different scales: one threshold for all would empty some
  scale = jnp.asarray([0.01, 0.1, 1.0, 10.0])[:, None, None]
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * scale if v.ndim == 3 else v, params)
  found = vj.discover(lambda p, x: _Scanned().apply({"params": p}, x), params, x)
  return params, found


def test_scanned_layer_stacks_are_found_with_their_layer_axes():
  _, found = _scanned_params()
  (name,) = [p for p in found.leaves if p.endswith("Dense_0/kernel")]
  kernel = found.leaves[name]
  assert kernel.kind == "stacked" and kernel.stack_axes == (0,) and kernel.in_axes == (1,)
  assert list(found.selection()["stacked"].values()) == [1]
  with pytest.raises(ValueError, match="no linear map"):
    found.selection(skip_stacked=True)


@pytest.mark.parametrize("kind", [pytest.param("prune", marks=pytest.mark.slow), "binarize",
                                  "low_rank"])
def test_each_layer_of_a_stack_gets_its_own_threshold_scale_and_factors(kind):
  params, found = _scanned_params()
  build = {"prune": lambda sel: vj.prune(0.9, **sel), "binarize": vj.binarize,
           "low_rank": lambda sel: vj.low_rank(2, **sel)}[kind]
  t = build(found.selection()) if kind != "binarize" else build(**found.selection())
  c = vj.compress(t, params, t.init(params))
  (name,) = [p for p in found.leaves if p.endswith("Dense_0/kernel")]
  k = np.asarray(dict(_paths.leaf_paths(c))[name])
  w = np.asarray(dict(_paths.leaf_paths(params))[name])
  for layer in range(4):
    if kind == "prune":  # 90 % of every layer (one threshold for all emptied layer 0)
      assert np.mean(k[layer] == 0) == pytest.approx(0.9, abs=0.01)
    elif kind == "binarize":  # two values per layer, at its own mean magnitude
      mags = np.unique(np.abs(k[layer]))
      assert len(mags) == 1
      np.testing.assert_allclose(mags[0], np.abs(w[layer]).mean(), rtol=1e-5)
    else:  # rank 2 per layer, not a rank-2 matrix of all four
      assert np.linalg.matrix_rank(k[layer], tol=1e-5 * np.abs(k[layer]).max()) == 2
  assert len({float(np.abs(k[layer]).max()) for layer in range(4)}) == 4


def test_a_param_used_in_a_batched_matmul_is_not_taken_for_a_linear_map():
  params = {"w": jnp.ones((3, 4, 5))}
  found = vj.discover(lambda p, x: jnp.einsum("bhi,hio->bho", x, p["w"]), params,
                      jnp.ones((2, 3, 4)))
  assert found.leaves["w"].kind == "elementwise"  # per-head maps: not one linear map


def test_an_integer_kernel_is_named_as_skipped_and_why():
  with pytest.raises(ValueError, match=r"Not floating, so never compressed: d/kernel \(int8\)"):
    vj.prune(0.5).init({"d": {"kernel": jnp.ones((3, 3), jnp.int8)}})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prune", "quantize"])
def test_a_trained_stack_exports_exactly(kind, tmp_path):
  params, found = _scanned_params()
  sel = found.selection()
  t = vj.prune(0.9, **sel) if kind == "prune" else vj.quantize(4, **sel)
  step = vj.make_train_step(_Scanned(), t, vj.linear_vanish(2), optax.adam(1e-2),
                            loss_fn=lambda logits, batch: jnp.mean(logits ** 2))
  state = step.init(params)
  for _ in range(3):
    state, _ = step(state, {"inputs": jnp.ones((2, 16)), "labels": jnp.zeros(2, jnp.int32)})
  rows = vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz").params()
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(step.compressed_params(state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (row,) = [r for r in rows if r["name"].endswith("Dense_0/kernel")]
  assert row["compressed_bytes"] < 0.35 * row["dense_bytes"], row


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.lin(x))


class _NNXStack(nnx.Module):
  """Layers built with nnx.vmap and run with nnx.scan (Flax's stacked-layers recipe)."""

  def __init__(self, rngs):
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
      return _NNXBlock(rngs)
    self.blocks = create(rngs.fork(split=4))
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)
    return self.head(body(x, self.blocks))


def _layer_scaled(w):
  """A stack whose layers have different scales (one threshold would empty some)."""
  return w * jnp.asarray([0.1, 1.0, 10.0, 100.0]).reshape((4,) + (1,) * (w.ndim - 1))


def _check_per_layer_prune(c, w):
  for layer in range(4):
    assert np.mean(np.asarray(c)[layer] == 0) == pytest.approx(0.9, abs=0.01)
  assert np.asarray(w).shape == np.asarray(c).shape


def test_nnx_vmap_scan_stack_is_found_and_pruned_per_layer():
  model = _NNXStack(nnx.Rngs(0))
  x = jnp.ones((2, 16))
  model.blocks.lin.kernel.value = _layer_scaled(model.blocks.lin.kernel.value)
  graphdef, params = nnx.split(model, nnx.Param)
  params = params.to_pure_dict()
  found = vj.discover(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
  k = found.leaves["blocks/lin/kernel"]
  assert (k.kind, k.in_axes, k.stack_axes) == ("stacked", (1,), (0,))
  assert found.leaves["head/kernel"].kind == "linear"
  assert found.leaves["blocks/lin/bias"].kind == "elementwise"
  step = vj.make_train_step(model, vj.prune(0.9), vj.linear_vanish(0), optax.sgd(0.0),
                            loss_fn=lambda logits, batch: logits.sum(), example=x)
  state = step.init()
  c = step.compressed_params(state)
  _check_per_layer_prune(c["blocks"]["lin"]["kernel"], params["blocks"]["lin"]["kernel"])


def test_haiku_style_param_dicts():
  """Haiku's {"linear": {"w", "b"}} naming: the w are linear maps, the b elementwise."""
  rng = np.random.RandomState(0)
  params = {"linear": {"w": jnp.asarray(rng.randn(16, 8)), "b": jnp.zeros(8)},
            "linear_1": {"w": jnp.asarray(rng.randn(8, 3)), "b": jnp.zeros(3)}}

  def apply_fn(p, x):
    h = jax.nn.relu(x @ p["linear"]["w"] + p["linear"]["b"])
    return h @ p["linear_1"]["w"] + p["linear_1"]["b"]

  x = jnp.ones((2, 16))
  found = vj.discover(apply_fn, params, x)
  assert {p: u.kind for p, u in found.leaves.items()} == {
      "linear/w": "linear", "linear/b": "elementwise",
      "linear_1/w": "linear", "linear_1/b": "elementwise"}
  tx = vj.wrap_optax(optax.sgd(0.1), vj.prune(0.5, granularity="neuron"),
                     vj.linear_vanish(0), apply_fn=apply_fn, params=params, example=x)
  c = vj.compressed_params(tx.init(params))
  assert np.mean(np.asarray(c["linear"]["w"]) == 0) == pytest.approx(0.5)
  np.testing.assert_array_equal(c["linear"]["b"], params["linear"]["b"])


@pytest.mark.parametrize("bounds", ["static", "traced"])
def test_fori_loop_layer_stacks(bounds):
  """w[i] inside a fori_loop body (a scan with static bounds, a while loop with traced
  ones) is a stack of layers, pruned layer by layer; outside a loop w[i] stays a lookup."""
  w = _layer_scaled(jnp.asarray(np.random.RandomState(1).randn(4, 16, 16)))
  params = {"w": w, "table": jnp.ones((10, 16))}
  n = 4 if bounds == "static" else jnp.int32(4)

  def apply_fn(p, x):
    h = p["table"][x]
    return jax.lax.fori_loop(0, n, lambda i, h: jax.nn.relu(h @ p["w"][i]), h)

  x = jnp.array([1, 2])
  found = vj.discover(apply_fn, params, x)
  assert (found.leaves["w"].kind, found.leaves["w"].in_axes,
          found.leaves["w"].stack_axes) == ("stacked", (1,), (0,))
  assert found.leaves["table"].kind == "lookup"
  t = vj.reselect(vj.prune(0.9), found)
  c = vj.compress(t, params, t.init(params))
  _check_per_layer_prune(c["w"], w)
  np.testing.assert_array_equal(c["table"], params["table"])


def test_a_table_read_row_by_row_in_a_loop_stays_a_lookup():
  """pos[t] inside a scan over time (not contracted) is a lookup, not a layer stack; the
  stacked weight beside it is still found."""
  params = {"pos": jnp.ones((5, 16)), "w": jnp.ones((5, 16, 16))}

  def apply_fn(p, x):
    def body(h, t):
      return jax.nn.relu((h + p["pos"][t]) @ p["w"][t]), None
    return jax.lax.scan(body, x, jnp.arange(5))[0]

  found = vj.discover(apply_fn, params, jnp.ones((2, 16)))
  assert found.leaves["pos"].kind == "lookup" and found.leaves["pos"].stack_axes == ()
  assert found.leaves["w"].kind == "stacked"


class _LinenZoo(nn.Module):
  @nn.compact
  def __call__(self, x):  # x: (batch, seq, 16)
    x = nn.Einsum((16, 4, 8), "bsd,dhk->bshk", name="proj")(x).reshape(x.shape[:2] + (32,))
    x = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
    return nn.Dense(3)(x.mean(1))


class _NNXZoo(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.lg = nnx.LinearGeneral(16, (4, 8), rngs=rngs)  # (in, heads, head_dim)
    self.ein = nnx.Einsum("bshk,hkd->bsd", (4, 8, 16), rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False,
                                       rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):  # x: (batch, 4, 4, 3)
    h = self.conv(x).reshape(x.shape[0], 16, 16)
    h = self.ein(self.lg(h))
    return self.head(self.attn(h).mean(1))


def test_linen_einsum_and_attention_axes():
  x = jnp.ones((2, 5, 16))
  params = _LinenZoo().init(jax.random.key(0), x)["params"]
  found = vj.discover(lambda p, x: _LinenZoo().apply({"params": p}, x), params, x)
  kinds = {p: (u.kind, u.in_axes) for p, u in found.leaves.items()}
  assert kinds["proj/kernel"] == ("linear", (0,))
  for name in ("query", "key", "value"):
    assert kinds[f"attn/{name}/kernel"] == ("linear", (0,))  # (in, heads, head_dim)
  assert kinds["attn/out/kernel"] == ("linear", (0, 1))       # (heads, head_dim, out)


def test_nnx_conv_linear_general_einsum_attention_axes_and_steps():
  model = _NNXZoo(nnx.Rngs(0))
  x = jnp.ones((2, 4, 4, 3))
  graphdef, params = nnx.split(model, nnx.Param)
  found = vj.discover(lambda p, x: nnx.merge(graphdef, p)(x), params.to_pure_dict(), x)
  kinds = {p: (u.kind, u.in_axes) for p, u in found.leaves.items()}
  assert kinds["conv/kernel"] == ("linear", (0, 1, 2))
  assert kinds["lg/kernel"] == ("linear", (0,))
  assert kinds["ein/kernel"] == ("linear", (0, 1))
  assert kinds["attn/query/kernel"] == ("linear", (0,))
  assert kinds["attn/out/kernel"] == ("linear", (0, 1))
  assert kinds["head/kernel"] == ("linear", (0,))
  step = vj.make_train_step(model, vj.quantize(4), vj.linear_vanish(2), optax.adam(1e-3),
                            loss_fn=lambda logits, batch: (logits ** 2).mean(), example=x)
  state = step.init()
  for _ in range(3):
    state, metrics = step(state, {"inputs": x})
  assert float(metrics["beta"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  c = step.compressed_params(state)
  q = np.asarray(c["ein"]["kernel"]).reshape(32, 16)  # inputs (heads, head_dim)
  assert max(len(np.unique(col)) for col in q.T) <= 15
