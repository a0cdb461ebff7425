"""qwix interop: a qwix PTQ model filled by vj.to_qwix computes our compressed model's
logits bit for bit (same codes, same scales, same rounding); what qwix cannot hold exactly
is refused in one line."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vcon_jax as vj

qwix = pytest.importorskip("qwix")


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(16)(x)


class _NNX(nnx.Module):
  def __init__(self, dtype=jnp.float32, *, rngs):
    self.a = nnx.Linear(64, 64, param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(64, param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.b = nnx.Linear(64, 16, param_dtype=dtype, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.norm(self.a(x))))


def _bits(a):
  a = np.asarray(a)
  return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _rules(qtype, tile=None, **kw):
  return [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, tile_size=tile, **kw)]


def _linen_export(tmp_path, transform, x):
  model = _Linen()
  step = vj.make_train_step(model, transform, vj.linear_vanish(0))
  state = step.init(model.init(jax.random.key(0), x)["params"])
  vj.export(step, state, tmp_path / "m.npz")
  return model, vj.load_compressed(tmp_path / "m.npz")


@pytest.mark.parametrize("bits,group,qtype", [(4, 32, jnp.int4), (3, 32, jnp.int4),
                                              (2, 16, jnp.int4), (8, None, jnp.int8),
                                              (4, None, jnp.int4)])
def test_linen_logits_equal(tmp_path, bits, group, qtype):
  x = np.random.RandomState(0).rand(8, 64).astype(np.float32)
  model, compact = _linen_export(tmp_path, vj.quantize(bits, group_size=group), x)
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules(qtype, group)))
  variables = vj.to_qwix(compact, qm, x)
  k = variables["params"]["Dense_0"]["kernel"].array
  assert k.qvalue.dtype == qtype  # held as integers, with our scales
  ours = compact.apply(model, x, decode="once")
  np.testing.assert_array_equal(_bits(qm.apply(variables, x)), _bits(ours))


def test_linen_asymmetric_and_pruned_codes(tmp_path):
  x = np.random.RandomState(1).rand(8, 64).astype(np.float32)
  model, compact = _linen_export(
      tmp_path, vj.quantize(4, group_size=32, symmetric=False), x)
  qm = qwix.quantize_model(model, qwix.PtqProvider(
      _rules(jnp.int4, 32, weight_calibration_method="minmax")))
  variables = vj.to_qwix(compact, qm, x)
  np.testing.assert_array_equal(_bits(qm.apply(variables, x)),
                                _bits(compact.apply(model, x, decode="once")))
  model, compact = _linen_export(
      tmp_path, vj.chain(vj.prune(sparsity=0.5), vj.quantize(8)), x)
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules(jnp.int8)))
  variables = vj.to_qwix(compact, qm, x)
  np.testing.assert_array_equal(_bits(qm.apply(variables, x)),
                                _bits(compact.apply(model, x, decode="once")))
  # sparse and asymmetric: a pruned entry's code is its group's zero point
  model, compact = _linen_export(
      tmp_path, vj.chain(vj.prune(sparsity=0.5),
                         vj.quantize(4, group_size=32, symmetric=False)), x)
  assert {leaf["format"].get("layout") for leaf in compact.manifest["leaves"]} & {
      "bitmask", "indices"}
  qm = qwix.quantize_model(model, qwix.PtqProvider(
      _rules(jnp.int4, 32, weight_calibration_method="minmax")))
  variables = vj.to_qwix(compact, qm, x)
  np.testing.assert_array_equal(_bits(qm.apply(variables, x)),
                                _bits(compact.apply(model, x, decode="once")))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_logits_equal_with_statistics(tmp_path, dtype):
  model = _NNX(dtype, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(2).rand(8, 64), dtype)
  model(x)  # BatchNorm statistics move off their start
  model.eval()
  step = vj.make_train_step(model, vj.quantize(4, group_size=32, scale_dtype=dtype),
                            vj.linear_vanish(0))
  state = step.init(model)
  vj.export(step, state, tmp_path / "m.npz")
  compact = vj.load_compressed(tmp_path / "m.npz")
  fresh = _NNX(dtype, rngs=nnx.Rngs(1))
  fresh.eval()
  qm = qwix.quantize_model(fresh, qwix.PtqProvider(_rules(jnp.int4, 32)), x)
  vj.to_qwix(compact, qm)
  assert qm.a.kernel.array.qvalue.dtype == jnp.int4
  np.testing.assert_array_equal(_bits(qm(x)), _bits(compact.apply(model, x, decode="once")))


def test_coarser_scales_repeat_over_finer_tiles(tmp_path):
  """Per-channel scales (and binary's one per layer) fit qwix tiles of 16 inputs."""
  x = np.random.RandomState(3).rand(8, 64).astype(np.float32)
  for transform in (vj.quantize(4), vj.binarize()):
    model, compact = _linen_export(tmp_path, transform, x)
    qm = qwix.quantize_model(model, qwix.PtqProvider(_rules(jnp.int4, 16)))
    variables = vj.to_qwix(compact, qm, x)
    assert variables["params"]["Dense_0"]["kernel"].array.scale.shape == (4, 64)
    np.testing.assert_array_equal(_bits(qm.apply(variables, x)),
                                  _bits(compact.apply(model, x, decode="once")))


def test_refusals(tmp_path):
  x = np.random.RandomState(0).rand(8, 64).astype(np.float32)
  model, compact = _linen_export(tmp_path, vj.quantize(4, group_size=32), x)
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules(jnp.int4, 64)))
  with pytest.raises(ValueError, match="tile_size=32"):  # qwix tiles cross our groups
    vj.to_qwix(compact, qm, x)
  with pytest.raises(ValueError, match="example input"):
    vj.to_qwix(compact, qwix.quantize_model(model, qwix.PtqProvider(_rules(jnp.int4, 32))))
  model, compact = _linen_export(tmp_path, vj.quantize(8), x)
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules(jnp.int4)))
  with pytest.raises(ValueError, match="outside the qwix model's int4"):
    vj.to_qwix(compact, qm, x)
  model, compact = _linen_export(tmp_path, vj.prune(sparsity=0.9), x)
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules(jnp.int8)))
  with pytest.raises(ValueError, match="leave it out of the qwix rules"):
    vj.to_qwix(compact, qm, x)
  # a bfloat16 model trained without scale_dtype: either carried exactly or refused
  bf = _NNX(jnp.bfloat16, rngs=nnx.Rngs(0))
  xb = jnp.asarray(x, jnp.bfloat16)
  step = vj.make_train_step(bf, vj.quantize(4, group_size=32), vj.linear_vanish(0))
  vj.export(step, step.init(bf), tmp_path / "b.npz")
  qb = qwix.quantize_model(_NNX(jnp.bfloat16, rngs=nnx.Rngs(0)),
                           qwix.PtqProvider(_rules(jnp.int4, 32)), xb)
  compact = vj.load_compressed(tmp_path / "b.npz")
  try:
    vj.to_qwix(compact, qb)
  except ValueError as e:
    assert "scale_dtype=jnp.bfloat16" in str(e)
  else:
    np.testing.assert_array_equal(_bits(qb(xb)), _bits(compact.apply(bf, xb, decode="once")))


_N, _D, _H = 4, 64, 16  # heads, model width, head width


class _Proj(nn.Module):
  """Gemma-style attention projections held as einsum weights: q ``(N, D, H)`` and a fused
  kv ``(2, N, D, H)``, both contracting ``D`` (not their first axis)."""

  @nn.compact
  def __call__(self, x):
    q = self.param("q", nn.initializers.lecun_normal(), (_N, _D, _H))
    kv = self.param("kv", nn.initializers.lecun_normal(), (2, _N, _D, _H))
    k = jnp.einsum("BSD,CKDH->CBSKH", x, kv)
    return jnp.einsum("BTD,NDH->BTNH", x, q) * k[0] + k[1]


class _Out(nn.Module):
  """The output projection ``(N, H, D)``: it contracts two axes, ``N`` and ``H``."""

  @nn.compact
  def __call__(self, y):
    o = self.param("o", nn.initializers.lecun_normal(), (_N, _H, _D))
    return jnp.einsum("BTNH,NHD->BTD", y, o)


class _Attn(nn.Module):
  out: bool = True

  @nn.compact
  def __call__(self, x):
    y = _Proj()(x)
    y = _Out()(y) if self.out else y.reshape(*y.shape[:2], -1)
    return y.mean(1)  # (B, 64) logits


def _einsum_export(tmp_path, transform, out=True):
  """An attention-style export after two training steps; the trace (example=) gives each
  einsum weight its contracting axes."""
  rng = np.random.RandomState(5)
  x = rng.rand(4, 3, _D).astype(np.float32)
  model = _Attn(out)
  step = vj.make_train_step(model, transform, vj.linear_vanish(2), example=x)
  state = step.init(model.init(jax.random.key(0), x)["params"])
  batch = {"inputs": x, "labels": rng.randint(0, 64, (4,))}
  for _ in range(2):
    state, _ = step(state, batch)
  vj.export(step, state, tmp_path / "e.npz")
  return model, vj.load_compressed(tmp_path / "e.npz"), x


def _rules_by_module(qtype, proj_tile, out_tile=None, **kw):
  return [qwix.QuantizationRule(module_path=".*Proj.*", weight_qtype=qtype,
                                tile_size=proj_tile, **kw),
          qwix.QuantizationRule(module_path=".*Out.*", weight_qtype=qtype,
                                tile_size=out_tile, **kw)]


def _check_einsum_model(model, compact, qm, x, scale_shapes):
  variables = vj.to_qwix(compact, qm, x)
  dense = compact.params()
  for mod, name in (("_Proj_0", "q"), ("_Proj_0", "kv"), ("_Out_0", "o")):
    if mod not in dense:
      continue
    k = variables["params"][mod][name].array
    assert k.scale.shape == scale_shapes[name], (name, k.scale.shape)
    # qwix's kernel is ours, bit for bit, in its own (einsum) shape
    np.testing.assert_array_equal(_bits(qwix.dequantize(k)), _bits(dense[mod][name]))
  got = qm.apply(variables, x)
  # qwix's einsum puts the weight first in its dot_general (jnp.einsum the input): on
  # this CPU the two orders round differently, so our logits bit for bit are ours run
  # through qwix's einsum; through jnp.einsum they agree to float32 rounding
  from qwix._src.core import einsum as qwix_einsum
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jnp, "einsum", qwix_einsum.einsum)
    same_op = model.apply({"params": dense}, x)
  np.testing.assert_array_equal(_bits(got), _bits(same_op))
  np.testing.assert_allclose(got, compact.apply(model, x, decode="once"), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("bits,qtype,proj_tile,out_tile", [
    (4, jnp.int4, None, None), (8, jnp.int8, 16, 8)])
def test_einsum_kernels_per_channel(tmp_path, bits, qtype, proj_tile, out_tile):
  """Per-channel scales of (N, D, H), (2, N, D, H) and (N, H, D) einsum kernels: one per
  output entry, repeated over qwix's tiles of the contracting axes (finer ones too)."""
  model, compact, x = _einsum_export(tmp_path, vj.quantize(bits))
  ins = {tuple(leaf["keys"])[-1]: leaf["format"].get("in_axes")
         for leaf in compact.manifest["leaves"]}
  assert ins["q"] == [1] and ins["kv"] == [2]  # traced contracting axes
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules_by_module(qtype, proj_tile,
                                                                    out_tile)))
  d = 1 if proj_tile is None else _D // proj_tile
  h = 1 if out_tile is None else _H // out_tile
  _check_einsum_model(model, compact, qm, x, {
      "q": (_N, d, _H), "kv": (2, _N, d, _H), "o": (1, h, _D)})


@pytest.mark.parametrize("group,tile,symmetric", [(32, 32, True), (32, 16, True),
                                                  (16, 16, False)])
def test_einsum_kernels_groups_along_contracting_axis(tmp_path, group, tile, symmetric):
  """int4 groups of g along the contracting D axis of q and kv are qwix tiles of g (or
  finer) along that axis, asymmetric ones with their zero points."""
  model, compact, x = _einsum_export(
      tmp_path, vj.quantize(4, group_size=group, symmetric=symmetric), out=False)
  kw = {} if symmetric else {"weight_calibration_method": "minmax"}
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules_by_module(jnp.int4, tile, **kw)))
  _check_einsum_model(model, compact, qm, x, {"q": (_N, _D // tile, _H),
                                              "kv": (2, _N, _D // tile, _H)})


def test_einsum_refusals_name_the_axis_and_both_layouts(tmp_path):
  # groups of 32 along D, qwix tiles of 64: a tile crosses our groups on kv's axis 2 (D)
  model, compact, x = _einsum_export(tmp_path, vj.quantize(4, group_size=32), out=False)
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules_by_module(jnp.int4, 64)))
  with pytest.raises(ValueError) as e:
    vj.to_qwix(compact, qm, x)
  msg = str(e.value)
  assert "\n" not in msg and "_Proj_0/kv (2, 4, 64, 16)" in msg, msg
  assert "along axis 2 (size 64)" in msg, msg
  assert "ours: input axes (2,), a scale per 32 inputs (32 of axis 2)" in msg, msg
  assert ("qwix: scale shape (2, 4, 1, 16): axis 0 per entry, axis 1 per entry, axis 2 "
          "shared, axis 3 per entry" in msg), msg
  assert "tile_size=32" in msg, msg
  # groups of 8 of the out-projection's H (per head): qwix shares one scale over the heads
  # axis (it tiles only an einsum's last contracting axis), which no tile_size changes
  model, compact, x = _einsum_export(tmp_path, vj.quantize(4, group_size=8))
  qm = qwix.quantize_model(model, qwix.PtqProvider(_rules_by_module(jnp.int4, 8, 8)))
  with pytest.raises(ValueError) as e:
    vj.to_qwix(compact, qm, x)
  msg = str(e.value)
  assert "_Out_0/o (4, 16, 64)" in msg and "along axis 0 (size 4)" in msg, msg
  assert "ours: input axes (0, 1), a scale per 8 inputs (8 of axis 1)" in msg, msg
  assert "qwix: scale shape (1, 2, 64): axis 0 shared, axis 1 in tiles of 8" in msg, msg
  assert "per channel" in msg and "(4, 16, 64) kernel here and (4, 16, 64)" not in msg


def test_readme_qwix_block_runs(tmp_path, monkeypatch):
  """The README's qwix lines, as written, on an NNX model exported to model.npz."""
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  code = re.search(r"### qwix: serve our export.*?```python\n(.*?)```", text, re.S).group(1)
  model = _NNX(rngs=nnx.Rngs(0))
  model.eval()
  x = jnp.asarray(np.random.RandomState(4).rand(8, 64), jnp.float32)
  step = vj.make_train_step(model, vj.quantize(4, group_size=32), vj.linear_vanish(0))
  monkeypatch.chdir(tmp_path)
  vj.export(step, step.init(model), "model.npz")
  scope = {"model": model, "x": x, "vj": vj, "qwix": qwix, "jnp": jnp}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  ours = vj.load_compressed("model.npz").apply(model, x, decode="once")
  np.testing.assert_array_equal(_bits(scope["logits"]), _bits(ours))
