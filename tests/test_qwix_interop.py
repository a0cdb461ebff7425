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
