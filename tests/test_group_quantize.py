"""Group-wise and asymmetric quantisation: the grid of each group, the input axes it runs
along, refusals, and exact export."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn

import vcon_jax as vj
from vcon_jax import _paths


def _w(shape, seed=0, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  # groups of very different scales, so that a shared scale would be visible
  w = rng.randn(*shape) * np.exp(rng.randn(*shape[:1], *([1] * (len(shape) - 1))))
  return jnp.asarray(w, dtype)


def _groups(x, g, in_axes=None):
  """(groups, g, fan_out) float32 view of a kernel."""
  mat = np.asarray(_paths.to_matrix(np.asarray(x, np.float32), in_axes))
  return mat.reshape(mat.shape[0] // g, g, mat.shape[1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_groups_have_their_own_scale_and_grid(bits):
  w = _w((64, 16))
  c = _groups(vj.ops.quantize_values(w, bits, group_size=16), 16)
  wg = _groups(w, 16)
  levels = 2 ** (bits - 1) - 1
  scale = np.abs(wg).max(axis=1, keepdims=True) * np.float32(1 / levels)
  np.testing.assert_allclose(np.abs(c).max(axis=1), np.abs(wg).max(axis=1), rtol=1e-6)
  q = c / scale
  np.testing.assert_allclose(q, np.rint(q), atol=1e-3)  # on the group's own grid
  assert np.abs(np.rint(q)).max() <= levels
  assert np.all(np.abs(c - wg) <= scale / 2 * (1 + 1e-5))
  # per channel would put all four groups of a unit on one grid: not what we get
  per_channel = _groups(vj.ops.quantize_values(w, bits), 16)
  assert not np.array_equal(per_channel, c)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asymmetric_codes_use_all_levels_and_keep_zero(bits):
  w = np.asarray(_w((64, 8), seed=1))
  w = np.abs(w) + 0.1  # all positive: a symmetric grid would waste its negative half
  w[5, 3] = 0.0
  c = _groups(vj.ops.quantize_values(jnp.asarray(w), bits, group_size=32, symmetric=False), 32)
  assert c.reshape(64, 8)[5, 3] == 0.0  # zero is a level
  wg = _groups(w, 32)
  top = 2 ** bits - 1
  hi, lo = np.maximum(wg.max(1), 0), np.minimum(wg.min(1), 0)
  scale = (hi - lo) * np.float32(1 / top)
  for i in range(c.shape[0]):
    for j in range(c.shape[2]):
      assert len(np.unique(c[i, :, j])) <= 2 ** bits
      assert np.all(np.abs(c[i, :, j] - wg[i, :, j]) <= scale[i, j] / 2 * (1 + 1e-4))
  sym = _groups(vj.ops.quantize_values(jnp.asarray(w), bits, group_size=32), 32)
  assert np.abs(c - wg).mean() < np.abs(sym - wg).mean()  # asymmetric fits better here


def test_groups_run_along_the_real_input_axes_of_attention_kernels():
  params = {"attn": {"query": {"kernel": _w((32, 4, 8))},   # (in, heads, head_dim)
                     "out": {"kernel": _w((4, 8, 32), 2)}}}  # (heads, head_dim, out)
  t = vj.quantize(bits=3, group_size=8)
  c = vj.compress(t, params, t.init(params))
  for name, axes in (("query", (0,)), ("out", (0, 1))):
    w, k = params["attn"][name]["kernel"], c["attn"][name]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(k), np.asarray(vj.ops.quantize_values(w, 3, True, axes, group_size=8)))
    np.testing.assert_allclose(np.abs(_groups(k, 8, axes)).max(1),
                               np.abs(_groups(w, 8, axes)).max(1), rtol=1e-6)


@pytest.mark.parametrize("build,match", [
    (lambda: vj.quantize(4, group_size=0), "group_size must be an integer >= 1"),
    (lambda: vj.quantize(4, group_size=2.0), "group_size must be an integer"),
    (lambda: vj.quantize(4, group_size=32, per_channel=False), "contradicts per_channel"),
    (lambda: vj.quantize(1, symmetric=False), "symmetric=False needs a fixed bits >= 2"),
    (lambda: vj.quantize(4, symmetric="no"), "symmetric must be True or False"),
])
def test_bad_group_arguments_raise_at_build(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_a_group_size_that_does_not_divide_the_fan_in_is_refused_at_init_in_one_line():
  params = {"a": {"kernel": _w((64, 8))}, "b": {"kernel": _w((48, 8))}}
  with pytest.raises(ValueError) as err:
    vj.quantize(4, group_size=32).init(params)
  msg = str(err.value)
  assert "\n" not in msg and "'b/kernel'" in msg and "fan-in 48" in msg
  assert "exclude='b/kernel'" in msg


class _MLP(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(64, param_dtype=self.dtype)(x))
    return nn.Dense(10, param_dtype=self.dtype)(h)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transform,bits,zero", [
    (lambda: vj.quantize(4, group_size=32), 4, False),
    (lambda: vj.quantize(3, group_size=32, symmetric=False), 3, True),
    (lambda: vj.quantize(2, group_size=32, symmetric=False), 2, True),
    pytest.param(lambda: vj.chain(vj.prune(sparsity=0.5), vj.quantize(4, group_size=32)), 4,
                 False, marks=pytest.mark.slow),
])
def test_export_packs_codes_with_a_scale_per_group_exactly(dtype, transform, bits, zero,
                                                            tmp_path):
  x = np.random.RandomState(0).rand(4, 128).astype(np.float32)
  model = _MLP(dtype)
  params = model.init(jax.random.key(0), x)["params"]
  step = vj.make_train_step(model, transform(), vj.linear_vanish(4), optax.adam(1e-2))
  state = step.init(params)
  batch = {"inputs": x, "labels": np.arange(4)}
  for _ in range(6):
    state, _ = step(state, batch)
  rows = vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz")
  for a, b in zip(jax.tree.leaves(loaded.params()), jax.tree.leaves(step.compressed_params(state))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for r in (r for r in rows if r["transform"]):
    n = math.prod(r["shape"])
    assert f"int{bits}/group32" in r["format"] and ("+zero" in r["format"]) == zero, r
    # packed codes, one float32 scale (and a one-byte zero point) per group of 32
    layout = n / 8 if "prune" in r["transform"] else 0  # the 1-bit mask
    assert r["compressed_bytes"] <= math.ceil(n * bits / 8) + layout + (4 + zero) * n / 32, r


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale_dtype", [jnp.float16, jnp.bfloat16])
def test_two_byte_scales_are_trained_and_stored(param_dtype, scale_dtype, tmp_path):
  x = np.random.RandomState(0).rand(4, 128).astype(np.float32)
  model = _MLP(param_dtype)
  params = model.init(jax.random.key(0), x)["params"]
  t = vj.quantize(4, group_size=32, scale_dtype=scale_dtype)
  c = vj.compress(t, params, t.init(params))
  w = _groups(params["Dense_0"]["kernel"], 32)
  scale = np.abs(w).max(1) * np.float32(1 / 7)
  stored = np.asarray(jnp.asarray(scale).astype(scale_dtype).astype(jnp.float32))
  q = _groups(c["Dense_0"]["kernel"], 32) / stored[:, None, :]
  # on the 2-byte scale's grid (bf16 params: q * scale is then rounded to bf16)
  np.testing.assert_allclose(q, np.rint(q), atol=1e-4 if param_dtype == jnp.float32 else 0.05)
  step = vj.make_train_step(model, t, vj.linear_vanish(0), optax.sgd(0.1))
  state = step.init(params)
  rows = vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz").params()
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(step.compressed_params(state))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for r in (r for r in rows if r["transform"]):
    n = math.prod(r["shape"])
    assert r["compressed_bytes"] <= n * 4 / 8 + 2 * n / 32, r  # 4.5 bits a weight


def test_bad_scale_dtype_is_refused():
  with pytest.raises(ValueError, match="scale_dtype must be one of float32, bfloat16, float16"):
    vj.quantize(4, scale_dtype=jnp.int8)
