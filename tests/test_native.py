"""decode="native": compact weights stay on the device, each layer decodes at its matmul.

Checked: the logits are bit for bit those of ``decode="once"`` (the dense kernels) for every
format, Linen and NNX, float32 and bfloat16; what stays on the device is the compact form
(read from ``jax.live_arrays()``, not only from the counter); inside a call only about one
layer's dense kernel exists (XLA's own memory analysis); ``"auto"`` says what it picked.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax.export import runtime


class _Linen(nn.Module):
  width: int = 64
  depth: int = 2

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


class _NNX(nnx.Module):
  def __init__(self, dtype=jnp.float32, *, rngs):
    self.a = nnx.Linear(48, 64, param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.b = nnx.Linear(64, 32, param_dtype=dtype, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x)))


CASES = {
    "prune": lambda: vj.prune(sparsity=0.9),
    "prune_2_4": lambda: vj.prune(n=2, m=4),
    "binarize": vj.binarize,
    "quantize2": lambda: vj.quantize(bits=2),
    "quantize3_g16_asym": lambda: vj.quantize(bits=3, group_size=16, symmetric=False),
    "quantize4_g16": lambda: vj.quantize(bits=4, group_size=16),
    "quantize5": lambda: vj.quantize(bits=5),
    "quantize8": lambda: vj.quantize(bits=8),
    "quantize12": lambda: vj.quantize(bits=12),
    "prune50": lambda: vj.prune(sparsity=0.5),  # stored as a bitmask
    "prune50+quantize4_asym": lambda: vj.chain(vj.prune(sparsity=0.5),
                                               vj.quantize(bits=4, symmetric=False)),
    "low_rank": lambda: vj.low_rank(rank=4),
    "prune+quantize8": lambda: vj.chain(vj.prune(sparsity=0.9), vj.quantize(bits=8)),
}


def _bits(a):
  a = np.asarray(a)
  return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _export_linen(tmp_path, transform, model, x):
  params = model.init(jax.random.key(0), x)["params"]
  step = vj.make_train_step(model, transform, vj.linear_vanish(0))
  path = tmp_path / "m.npz"
  vj.export(step, step.init(params), path)
  return vj.load_compressed(path), params


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_equals_once_linen(tmp_path, case):
  """Every stored form (see the formats asserted below) decodes at its matmul to exactly
  the dense kernel's logits."""
  x = np.random.RandomState(0).rand(8, 48).astype(np.float32)
  loaded, _ = _export_linen(tmp_path, CASES[case](), _Linen(), x)
  once = loaded.apply(_Linen(), x, decode="once")
  run = loaded.apply_fn(_Linen(), decode="native")
  np.testing.assert_array_equal(_bits(run(x)), _bits(once))
  assert run.decode == "native"
  if case == "low_rank":
    assert run.native_layers == [] and len(run.fast_layers) == 3
  else:
    assert run.native_layers == [f"Dense_{i}/kernel" for i in range(3)]
  layouts = {leaf["format"].get("layout") for leaf in loaded.manifest["leaves"]}
  if case.startswith("prune50"):
    assert "bitmask" in layouts  # the jax.numpy bitmask decode is exercised


def test_native_linen_bfloat16(tmp_path):
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(
          nn.relu(nn.Dense(32, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)))

  x = jnp.asarray(np.random.RandomState(0).rand(4, 48), jnp.bfloat16)
  for t in (vj.quantize(4, group_size=16), vj.prune(n=2, m=4), vj.prune(sparsity=0.5)):
    loaded, _ = _export_linen(tmp_path, t, M(), x)
    out = loaded.apply(M(), x, decode="native")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(out), _bits(loaded.apply(M(), x, decode="once")))


def test_auto_prefers_once_when_some_coded_kernel_is_not_a_site(tmp_path, monkeypatch):
  """Where auto would run native (GPU / TPU; faked here), a model with a coded kernel that
  is not a plain Dense / Linear runs "once" instead (it would be decoded whole in every
  call); a plain MLP runs native."""
  monkeypatch.setattr(runtime, "auto_decode", lambda backend=None: "native")
  x = np.random.RandomState(0).rand(2, 48).astype(np.float32)
  loaded, _ = _export_linen(tmp_path, vj.quantize(4), _Linen(), x)
  run = loaded.apply_fn(_Linen())
  run(x)
  assert run.decode == "native" and len(run.native_layers) == 3

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((4, 8))(x)
      return nn.Dense(5)(h.reshape(h.shape[0], -1))

  loaded, _ = _export_linen(tmp_path, vj.quantize(4, in_axes={"DenseGeneral_0/kernel": 1}),
                            M(), x)
  run = loaded.apply_fn(M())
  np.testing.assert_array_equal(_bits(run(x)), _bits(loaded.apply(M(), x, decode="once")))
  assert run.decode == "once" and run.native_layers == []
  nnx_model = _NNX(rngs=nnx.Rngs(0))
  step = vj.make_train_step(nnx_model, vj.quantize(4), vj.linear_vanish(0))
  vj.export(step, step.init(nnx_model), tmp_path / "n.npz")
  run = vj.load_compressed(tmp_path / "n.npz").apply_fn(nnx_model)
  run(jnp.asarray(x))
  assert run.decode == "native" and run.native_layers == ["a/kernel", "b/kernel"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["prune", "prune_2_4", "quantize3_g16_asym", "binarize"])
def test_native_equals_once_nnx(tmp_path, case, dtype):
  model = _NNX(dtype, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(1).rand(4, 48), dtype)
  step = vj.make_train_step(model, CASES[case](), vj.linear_vanish(0))
  state = step.init(model)
  vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz")
  run = loaded.apply_fn(model, decode="native")
  out = run(x)
  np.testing.assert_array_equal(_bits(out), _bits(loaded.apply(model, x, decode="once")))
  assert out.dtype == dtype
  assert run.native_layers == ["a/kernel", "b/kernel"]
  # and what training computes at beta = 0
  trained = nnx.clone(model)
  nnx.update(trained, step.compressed_params(state))
  np.testing.assert_array_equal(_bits(out), _bits(trained(x)))


def _new_live(before, *exclude):
  skip = {id(a) for a in exclude}
  return [a for a in jax.live_arrays() if id(a) not in before and id(a) not in skip]


def test_native_holds_the_compact_form(tmp_path):
  """Read from the live device arrays: after a native call, no dense kernel exists and the
  held bytes are the packed codes and scales; after a "once" call the kernels are there."""
  width = 256
  x = np.random.RandomState(0).rand(2, width).astype(np.float32)
  model = _Linen(width)
  loaded, params = _export_linen(
      tmp_path, vj.quantize(4, group_size=32, scale_dtype=jnp.bfloat16), model, x)
  dense_kernel_bytes = sum(p["kernel"].size * 4 for p in params.values())
  del params
  before = {id(a) for a in jax.live_arrays()}
  run = loaded.apply_fn(model, decode="native")
  out = run(x)
  held = _new_live(before, out)
  assert not [a for a in held if a.shape == (width, width)], [a.shape for a in held]
  assert sum(a.nbytes for a in held) == run.device_bytes() == loaded.device_bytes()
  kernel_forms = sum(a.nbytes for a in held if a.dtype != jnp.float32)  # codes, scales
  assert kernel_forms <= 0.15 * dense_kernel_bytes, (kernel_forms, dense_kernel_bytes)
  assert run.device_bytes() <= 0.16 * dense_kernel_bytes
  once = loaded.apply_fn(model, decode="once")
  out2 = once(x)
  held = _new_live(before, out, out2)
  assert [a for a in held if a.shape == (width, width) and a.dtype == jnp.float32]
  assert once.device_bytes() >= dense_kernel_bytes


def test_native_int8_bytes(tmp_path):
  x = np.random.RandomState(0).rand(2, 128).astype(np.float32)
  model = _Linen(128)
  loaded, params = _export_linen(tmp_path, vj.quantize(8), model, x)
  kernels = sum(p["kernel"].size * 4 for p in params.values())
  run = loaded.apply_fn(model, decode="native")
  run(x)
  biases = sum(p["bias"].size * 4 for p in params.values())
  assert run.device_bytes() - biases <= 0.27 * kernels


def test_native_decodes_one_layer_at_a_time(tmp_path):
  """XLA's memory analysis of the call: the temporaries hold about one dense kernel, not
  all four (the decode of a layer waits for its input)."""
  width = 256
  x = np.random.RandomState(0).rand(4, width).astype(np.float32)
  model = _Linen(width, depth=4)
  loaded, _ = _export_linen(tmp_path, vj.quantize(8), model, x)
  one_kernel = width * width * 4
  run = loaded.apply_fn(model, decode="native")
  temp = run.lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp < 1.5 * one_kernel, (temp, one_kernel)


def test_native_leaves_other_layers_exact(tmp_path):
  """A coded kernel outside a plain Dense (DenseGeneral over two axes) is decoded at the
  start of the call; the logits still equal the dense kernels'."""

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((4, 8))(x)
      return nn.Dense(5)(h.reshape(h.shape[0], -1))

  x = np.random.RandomState(0).rand(3, 16).astype(np.float32)
  loaded, _ = _export_linen(tmp_path, vj.quantize(4, in_axes={"DenseGeneral_0/kernel": 1}),
                            M(), x)
  run = loaded.apply_fn(M(), decode="native")
  np.testing.assert_array_equal(_bits(run(x)), _bits(loaded.apply(M(), x, decode="once")))
  assert run.native_layers == ["Dense_0/kernel"]


def test_auto_says_what_it_picks(tmp_path):
  assert runtime.auto_decode("cpu") == "once"
  assert runtime.auto_decode("gpu") == runtime.auto_decode("tpu") == "native"
  x = np.random.RandomState(0).rand(2, 48).astype(np.float32)
  loaded, _ = _export_linen(tmp_path, vj.quantize(4), _Linen(), x)
  run = loaded.apply_fn(_Linen())
  run(x)
  assert run.decode == runtime.auto_decode()
  assert "decode=" in repr(run)
  with pytest.raises(ValueError, match="decode must be one of"):
    loaded.apply_fn(_Linen(), decode="int8")
  with pytest.raises(ValueError, match="call it once"):
    loaded.apply_fn(_Linen(), decode="native").device_bytes()
