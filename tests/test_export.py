"""Compact export: exact round trips for every transform and chains, sizes from the format."""

import functools
import json
import math
import os
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax import LeafSpec
from vcon_jax.export import codec, encoder, format as export_format
from vcon_experiments.models import get_model

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


_X = np.random.RandomState(0).rand(8, 300).astype(np.float32)
_LINEN = _MLP()
_LINEN_PARAMS = _LINEN.init(jax.random.key(0), _X)["params"]

LINEN_CASES = {
    "prune": lambda: vj.prune(sparsity=0.9),
    "prune_2_4": lambda: vj.prune(n=2, m=4),
    "binarize": vj.binarize,
    "quantize2": lambda: vj.quantize(bits=2),
    "quantize4": lambda: vj.quantize(bits=4),
    "quantize4_per_layer": lambda: vj.quantize(bits=4, per_channel=False),
    "quantize8": lambda: vj.quantize(bits=8),
    "quantize4_group4": lambda: vj.quantize(bits=4, group_size=4),
    "quantize3_group4_asym": lambda: vj.quantize(bits=3, group_size=4, symmetric=False),
    "quantize2_asym": lambda: vj.quantize(bits=2, symmetric=False),
    "low_rank": lambda: vj.low_rank(rank=4),
    "prune+quantize8": lambda: vj.chain(vj.prune(sparsity=0.9), vj.quantize(bits=8)),
    "quantize8+low_rank": lambda: vj.chain(vj.quantize(bits=8), vj.low_rank(rank=4)),
}


@functools.lru_cache(maxsize=None)
def _linen_step(case):
  """One step (and its compiled compressed_params) per case, shared by the tests."""
  step = vj.make_train_step(_LINEN, LINEN_CASES[case](), vj.linear_vanish(0))
  return step, step.init(_LINEN_PARAMS)


@functools.lru_cache(maxsize=None)
def _nnx_base(name, items):
  # built once, under one jit: NNX's eager initialisers would compile op by op
  return nnx.jit(lambda: get_model(name, **dict(items)))()


def _nnx_model(name, **kwargs):
  """A fresh copy of a cached NNX model."""
  return nnx.clone(_nnx_base(name, tuple(sorted(kwargs.items()))))


def _selected(rows):
  return [r for r in rows if r["transform"]]


def _check_sizes(case, rows):
  """The size rules, from the export's own per-layer byte counts."""
  sel = _selected(rows)
  assert sel, rows
  dense = sum(r["dense_bytes"] for r in sel)
  comp = sum(r["compressed_bytes"] for r in sel)
  for r in sel:
    assert r["dense_bytes"] == 4 * math.prod(r["shape"])
  if case.startswith("prune_2_4"):
    assert comp <= (0.5 * 4 + 1 / 8) / 4 * dense  # half the values + 2-bit positions
  elif case.startswith("prune+quantize8"):
    # 1-bit mask + one byte per kept weight + per-channel scales
    assert comp <= (1 / 8 + 0.1) / 4 * dense + sum(4 * r["shape"][-1] for r in sel)
  elif case.startswith("prune"):
    assert comp <= 0.15 * dense, (comp, dense)
  elif case == "binarize":
    assert comp <= dense / 25
  elif case.startswith("quantize") and "low_rank" not in case:
    bits = int(case[len("quantize"):].split("_")[0])
    for r in sel:
      n, fan_out = math.prod(r["shape"]), r["shape"][-1]
      scales = n // 4 if "group4" in case else fan_out  # float32, plus a zero-point byte
      per_scale = 5 if case.endswith("asym") else 4
      assert r["compressed_bytes"] <= math.ceil(n * bits / 8) + per_scale * scales, r
  if "low_rank" in case:
    for r in sel:
      m, n = r["shape"]
      assert r["format"] == "low_rank(r=4)"
      assert r["rank"] == 4
      assert r["compressed_bytes"] == 4 * (m + n) * 4  # r (m + n) fp32 values


def _assert_params(loaded, reference, low_rank):
  flat_l, tree_l = jax.tree.flatten(loaded)
  flat_r, tree_r = jax.tree.flatten(reference)
  assert tree_l == tree_r
  for a, b in zip(flat_l, flat_r):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    if low_rank:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(a, b)  # bit-for-bit the compressed values


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "prune+quantize8"
                                  else c for c in sorted(LINEN_CASES)])
def test_linen_round_trip_and_sizes(case, tmp_path):
  step, state = _linen_step(case)
  path = tmp_path / "model.npz"
  rows = vj.export(step, state, path)
  assert os.listdir(tmp_path) == ["model.npz"]  # no temporary file left behind

  cparams = step.compressed_params(state)
  loaded = vj.load_compressed(path)
  _assert_params(loaded.params(), cparams, "low_rank" in case)
  reference = _LINEN.apply({"params": cparams}, _X)
  _check_sizes(case, rows)
  for decode in ("once", "on_the_fly"):
    np.testing.assert_allclose(loaded.apply(_LINEN, _X, decode=decode), reference,
                               rtol=1e-5, atol=1e-5, err_msg=decode)
    if case.endswith("low_rank"):
      assert loaded.fast_layers == ["Dense_0/kernel", "Dense_1/kernel"]
    else:
      assert loaded.fast_layers == []


def _entry_params(runner):
  """Shapes of the jitted computation's inputs (``f32[300,64]``, ...)."""
  text = runner.lower(_X).as_text()
  main = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
  return re.findall(r"tensor<([^>]*)>", main)


@pytest.mark.parametrize("decode", ["once", "on_the_fly"])
def test_low_rank_runs_as_two_thin_matmuls(decode, tmp_path):
  step, state = _linen_step("low_rank")
  vj.export(step, state, tmp_path / "m.npz")
  runner = vj.load_compressed(tmp_path / "m.npz").apply_fn(_LINEN, decode=decode)
  hlo = runner.lower(_X).compile().as_text()
  assert "f32[300,4]" in hlo  # the factor A is an input
  assert "f32[300,64]" not in hlo  # the dense kernel is never rebuilt


class _Mixed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.DenseGeneral(64)(x)))


def test_decode_modes_inputs_and_caching(tmp_path):
  """once: dense kernels are the jit's inputs (shared with params()); on the fly: the packed
  arrays are, sparse ones as values and sorted int32 positions."""
  for case in ("quantize4", "prune"):
    step, state = _linen_step(case)
    vj.export(step, state, tmp_path / f"{case}.npz")
    loaded = vj.load_compressed(tmp_path / f"{case}.npz")
    once = _entry_params(loaded.apply_fn(_LINEN))  # the default
    assert "300x64xf32" in once and "64x10xf32" in once
    assert not any(t.endswith(("xui8", "xi32")) for t in once), once
    fly = _entry_params(loaded.apply_fn(_LINEN, decode="on_the_fly"))
    assert "300x64xf32" not in fly
    if case == "quantize4":
      assert "9600xui8" in fly  # 300 * 64 4-bit codes
    else:
      nnz = int(np.count_nonzero(step.compressed_params(state)["Dense_0"]["kernel"]))
      assert f"{nnz}xi32" in fly and f"{nnz}xf32" in fly, fly
      fmt, arrays = loaded._runtime_leaf(1)  # Dense_0/kernel (leaves sorted: bias first)
      assert fmt["layout"] == "positions" and np.all(np.diff(np.asarray(arrays["positions"])) > 0)
  # decoded once, on the device, shared by params() and the runs
  assert loaded.params()["Dense_0"]["kernel"] is loaded._dense_leaf(1)
  with pytest.raises(ValueError, match="decode must be one of"):
    loaded.apply(_LINEN, _X, decode=True)

  # a low-rank layer without the thin-matmul path (DenseGeneral): its kernel A @ B is formed
  # once with decode="once", in every call on the fly; Dense runs as (x @ A) @ B in both
  model = _Mixed()
  params = model.init(jax.random.key(1), _X)["params"]
  step = vj.make_train_step(model, vj.low_rank(rank=4), vj.linear_vanish(0))
  state = step.init(params)
  vj.export(step, state, tmp_path / "mixed.npz")
  loaded = vj.load_compressed(tmp_path / "mixed.npz")
  reference = model.apply({"params": step.compressed_params(state)}, _X)
  for decode, dense_kernel in (("once", True), ("on_the_fly", False)):
    runner = loaded.apply_fn(model, decode=decode)
    np.testing.assert_allclose(runner(_X), reference, rtol=1e-5, atol=1e-5, err_msg=decode)
    assert loaded.fast_layers == ["Dense_0/kernel"]
    inputs = _entry_params(runner)
    assert ("300x64xf32" in inputs) == dense_kernel, (decode, inputs)
    assert "64x4xf32" in inputs and "4x10xf32" in inputs  # Dense_0's factors


@pytest.mark.slow
def test_chain_on_moved_weights_and_summary(tmp_path, capsys):
  step, state = _linen_step("prune+quantize8")
  # weights moved away from where the transform state was initialised, as by training
  rng = np.random.RandomState(5)
  moved = jax.tree.map(lambda p: p + 0.05 * rng.randn(*p.shape).astype(np.float32),
                       state.params)
  state = state._replace(params=moved, step=jnp.asarray(2, jnp.int32))
  rows = vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz")
  cparams = step.compressed_params(state)
  _assert_params(loaded.params(), cparams, False)
  np.testing.assert_allclose(loaded.apply(_LINEN, _X), _LINEN.apply({"params": cparams}, _X),
                             rtol=1e-5, atol=1e-5)
  assert loaded.step == 2
  for r in _selected(rows):
    assert r["transform"] == "prune+quantize" and r["bits"] == 8
    assert abs(r["sparsity"] - 0.9) < 0.01
    assert r["format"].endswith("+int8/channel")

  # summary: from the step, from the file and from the loaded model agree; it prints
  from_step = vj.summary(step, state)
  printed = capsys.readouterr().out
  assert "Dense_0/kernel" in printed and "total" in printed and "compressed layers" in printed
  from_file = vj.summary(tmp_path / "m.npz", print_fn=None)
  assert list(from_step) == list(rows) == list(from_file) == list(loaded.summary(None))
  totals = from_file.totals
  assert totals["compressed_layers_bytes"] == sum(r["compressed_bytes"] for r in _selected(rows))
  assert totals["dense_bytes"] == sum(r["dense_bytes"] for r in rows)
  assert totals["file_bytes"] == os.path.getsize(tmp_path / "m.npz")
  assert {"name", "shape", "transform", "sparsity", "bits", "rank", "dense_bytes",
          "compressed_bytes"} <= set(rows[0])


NNX_CASES = {
    "prune": lambda: vj.prune(sparsity=0.9),
    "binarize": vj.binarize,
    "quantize4": lambda: vj.quantize(bits=4),
    "low_rank": lambda: vj.low_rank(rank=4),
    "prune_2_4": lambda: vj.prune(n=2, m=4),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "prune" else c
                                  for c in sorted(NNX_CASES)])
def test_nnx_mlp_round_trip(case, tmp_path):
  module = _nnx_model("mlp", in_features=40, hidden=(32,), num_classes=10)
  x = np.random.RandomState(1).rand(4, 40).astype(np.float32)
  step = vj.make_train_step(module, NNX_CASES[case](), vj.linear_vanish(0))
  state = step.init()
  rows = vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz")
  cparams = step.compressed_params(state)
  _assert_params(loaded.params(), cparams.to_pure_dict(), case == "low_rank")
  assert isinstance(loaded.params(module), nnx.State)

  reference = nnx.clone(module)
  nnx.update(reference, cparams)  # the README's route for NNX
  reference.eval()
  for decode in ("once", "on_the_fly"):
    np.testing.assert_allclose(loaded.apply(module, x, decode=decode), reference(x),
                               rtol=1e-5, atol=1e-5, err_msg=decode)
  other = nnx.clone(module)
  nnx.update(other, loaded.params())  # the plain dict works with nnx.update too
  other.eval()
  np.testing.assert_allclose(other(x), reference(x), rtol=1e-5, atol=1e-5)
  if case == "low_rank":
    assert loaded.fast_layers == ["head/kernel", "layers/0/kernel"]
    for r in _selected(rows):
      assert r["compressed_bytes"] == 4 * sum(r["shape"]) * 4
  if case in ("prune", "binarize"):
    _check_sizes(case, rows)


@pytest.mark.slow
def test_nnx_cnn_chain_with_batch_stats(tmp_path):
  """Convs int4 (4-D kernels), dense layers low rank (fast path), BatchNorm state kept."""
  module = _nnx_model("cnn", features=(4, 8), hidden=16, image_size=8)
  x = np.random.RandomState(2).rand(4, 8, 8, 1).astype(np.float32)
  t = vj.chain(vj.quantize(bits=4, where=r"convs/\d+/kernel"),
               vj.low_rank(rank=2, where=r"(fc|head)/kernel"))
  step = vj.make_train_step(module, t, vj.linear_vanish(0))
  state = step.init()
  # trained-looking BatchNorm statistics (the export must carry them)
  shift = lambda a: a * 1.5 + 0.25 if jnp.issubdtype(a.dtype, jnp.floating) else a
  state = state._replace(model_state=jax.tree.map(shift, state.model_state))
  rows = vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz")
  reference, _ = step.evaluate(state, {"inputs": x, "labels": np.zeros(4, np.int32)})
  np.testing.assert_allclose(loaded.apply(module, x), reference, rtol=1e-5, atol=1e-5)
  assert loaded.fast_layers == ["fc/kernel", "head/kernel"]
  by_name = {r["name"]: r for r in rows}
  conv = by_name["convs/1/kernel"]
  assert conv["format"] == "dense+int4/channel" and conv["shape"] == (3, 3, 4, 8)
  assert conv["compressed_bytes"] == 3 * 3 * 4 * 8 // 2 + 8 * 4
  assert by_name["fc/kernel"]["compressed_bytes"] == 2 * (32 + 16) * 4
  assert by_name["head/kernel"]["transform"] == "low_rank"
  assert by_name["norms/0/scale"]["transform"] == ""  # untouched, stored as is
  stats = jax.tree.leaves(loaded.model_state())
  assert any(np.allclose(np.asarray(a), 1.75) for a in stats)  # the shifted variances


def test_format_detected_from_values_without_metadata(tmp_path):
  t = vj.quantize(bits=4)
  t = t._replace(describe=lambda path, leaf, state, count=0: ())  # a custom transform
  step = vj.make_train_step(_LINEN, t, vj.linear_vanish(0))
  state = step.init(_LINEN_PARAMS)
  rows = vj.export(step, state, tmp_path / "m.npz")
  assert [r["format"] for r in _selected(rows)] == ["dense+int4/channel"] * 2
  assert all(r["transform"] == "custom" for r in _selected(rows))
  loaded = vj.load_compressed(tmp_path / "m.npz")
  _assert_params(loaded.params(), step.compressed_params(state), False)


def _np_quantize(w, bits, per_channel=True):
  x = w.astype(np.float32)
  axis = 0 if per_channel else None
  if bits == 1:
    mean = np.abs(x).mean(axis=axis, keepdims=True)
    return np.where(x >= 0, mean, -mean).astype(w.dtype)
  levels = 2 ** (bits - 1) - 1
  scale = (np.abs(x).max(axis=axis, keepdims=True) / np.float32(levels)).astype(np.float32)
  return (np.clip(np.rint(x / scale), -levels, levels) * scale).astype(w.dtype)


def _np_keep(w, keep_per_row, rows):
  """Zeroes all but the largest ``keep_per_row`` magnitudes of each row of ``rows(w)``."""
  r = rows(np.abs(w.astype(np.float32)))
  order = np.argsort(-r, axis=1, kind="stable")[:, :keep_per_row]
  mask = np.zeros(r.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return mask


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_leaf_codecs_exact(dtype, tmp_path):
  rng = np.random.RandomState(4)
  w = rng.randn(96, 12).astype(dtype)
  one_of_four = _np_keep(w, 1, lambda a: a.T.reshape(-1, 4)).reshape(12, 96).T
  three_pct = _np_keep(w, 35, lambda a: a.reshape(1, -1)).reshape(w.shape)
  forty_pct = _np_keep(w, 460, lambda a: a.reshape(1, -1)).reshape(w.shape)
  cases = {  # name: (values, settings, (layout, codec))
      "int3": (_np_quantize(w, 3), (LeafSpec("quantize", bits=3, per_channel=True),),
               (None, "int")),  # any layout
      "binary": (_np_quantize(w, 1, per_channel=False), (LeafSpec("binarize"),),
                 ("dense", "binary")),
      "nm": (np.where(one_of_four, w, 0).astype(dtype), (LeafSpec("prune", pattern=(1, 4)),),
             ("nm", "float")),
      "indices": (np.where(three_pct, w, 0).astype(dtype), (LeafSpec("prune"),),
                  ("indices", "float")),
      "bitmask": (np.where(forty_pct, w, 0).astype(dtype), (LeafSpec("prune"),),
                  ("bitmask", "float")),
      "bitmask_int4": (_np_quantize(np.where(forty_pct, w, 0).astype(dtype), 4),
                       (LeafSpec("prune"), LeafSpec("quantize", bits=4, per_channel=True)),
                       ("bitmask", "int")),
  }
  encoded = {}
  for name, (c, specs, expected) in cases.items():
    fmt, arrays = encoder.encode_selected(c, specs)
    assert fmt["kind"] == "coded", name
    assert fmt["layout"] == (expected[0] or fmt["layout"]), (name, fmt)
    assert fmt["codec"] == expected[1], (name, fmt)
    stored, views = export_format.storable(arrays)
    np.savez(tmp_path / "a.npz", **stored)
    with np.load(tmp_path / "a.npz") as z:
      back = {k: z[k].view(jnp.dtype(views[k])) if k in views else z[k] for k in z.files}
    out = codec.decode_leaf(np, fmt, back, c.shape, c.dtype, c.shape)
    assert out.dtype == c.dtype
    np.testing.assert_array_equal(out, c)
    # the on-the-fly form: sparse layouts as sorted positions, values permuted to match
    encoded[name] = codec.runtime_coded(fmt, back, *c.shape)
    assert encoded[name][0]["layout"] == ("dense" if fmt["layout"] == "dense" else "positions")
    out = codec.decode_leaf(np, *encoded[name], c.shape, c.dtype, c.shape)
    np.testing.assert_array_equal(out, c)

  @jax.jit
  def decode_all(arrays):
    return {n: codec.decode_leaf(jnp, encoded[n][0], a, w.shape, w.dtype, w.shape)
            for n, a in arrays.items()}

  out = decode_all({n: back for n, (_, back) in encoded.items()})
  for name, (c, _, _) in cases.items():
    np.testing.assert_array_equal(np.asarray(out[name]), c, err_msg=name)


def test_bad_paths_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No compact export at"):
    vj.load_compressed(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="is a directory"):
    vj.load_compressed(tmp_path)
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match="not a vcon_jax compact export"):
    vj.load_compressed(tmp_path / "notes.txt")
  np.savez(tmp_path / "other.npz", a=np.ones(3))
  with pytest.raises(ValueError, match="not a vcon_jax compact export.*__manifest__"):
    vj.load_compressed(tmp_path / "other.npz")
  np.save(tmp_path / "one.npy", np.ones(3))
  with pytest.raises(ValueError, match="single array"):
    vj.load_compressed(tmp_path / "one.npy")
  manifest = np.frombuffer(json.dumps({"format": "vcon_jax.compact", "version": 99}).encode(),
                           np.uint8)
  np.savez(tmp_path / "new.npz", __manifest__=manifest)
  with pytest.raises(ValueError, match="newer vcon_jax"):
    vj.load_compressed(tmp_path / "new.npz")

  step, state = _linen_step("binarize")
  with pytest.raises(ValueError, match="is a directory"):
    vj.export(state, tmp_path, model=step.model)
  with pytest.raises(ValueError, match=r"takes \(state, path, model=...\)"):
    vj.export(object(), state, tmp_path / "x.npz")
  with pytest.raises(ValueError, match="need the model"):
    vj.export(state, tmp_path / "x.npz")
  with pytest.raises(ValueError, match="needs the TrainState"):
    vj.summary(step)  # the deprecated spelling, without its state
  vj.export(state, tmp_path / "sub" / "dir" / "m.npz", model=step.model)  # folders created
  loaded = vj.load_compressed(tmp_path / "sub" / "dir" / "m.npz")
  model = _nnx_model("mlp", in_features=300, hidden=(64,))
  with pytest.raises(ValueError, match="Linen model"):
    loaded.apply(model, _X)


def test_readme_compact_export_section_runs(tmp_path, monkeypatch):
  code = re.search(r"## Compact export.*?```python\n(.*?)```", README.read_text(),
                   re.S).group(1)
  monkeypatch.chdir(tmp_path)
  step, state = _linen_step("prune")
  scope = {"vj": vj, "step": step, "state": state, "model": _LINEN, "x": _X}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert os.path.exists(tmp_path / "model.npz")


def test_scheduled_rank_and_unfinished_chain_member(tmp_path):
  # gradual rank: factors sized max_rank, columns beyond the current rank stored no more
  t = vj.low_rank(rank=lambda count: 3, max_rank=6)
  step = vj.make_train_step(_LINEN, t, vj.linear_vanish(0))
  state = step.init(_LINEN_PARAMS)
  rows = vj.export(step, state, tmp_path / "rank.npz")
  for r in _selected(rows):
    assert r["rank"] == 3 and r["compressed_bytes"] == 3 * sum(r["shape"]) * 4
  loaded = vj.load_compressed(tmp_path / "rank.npz")
  cparams = step.compressed_params(state)
  _assert_params(loaded.params(), cparams, True)
  np.testing.assert_allclose(loaded.apply(_LINEN, _X), _LINEN.apply({"params": cparams}, _X),
                             rtol=1e-5, atol=1e-5)

  # a chain member whose own schedule is not at 0: values are a blend, stored as they are
  t = vj.chain(vj.quantize(bits=8), vj.low_rank(rank=4), schedules=(None, vj.constant(0.5)))
  step = vj.make_train_step(_LINEN, t, vj.linear_vanish(0))
  state = step.init(_LINEN_PARAMS)
  rows = vj.export(step, state, tmp_path / "blend.npz")
  assert [r["format"] for r in _selected(rows)] == ["raw", "raw"]
  _assert_params(vj.load_compressed(tmp_path / "blend.npz").params(),
                 step.compressed_params(state), False)


def test_nnx_run_leaves_the_module_alone_and_checks_its_params(tmp_path):
  module = _nnx_model("mlp", in_features=40, hidden=(32,), num_classes=10)
  x = np.random.RandomState(1).rand(4, 40).astype(np.float32)
  step = vj.make_train_step(module, vj.low_rank(rank=4), vj.linear_vanish(0))
  vj.export(step, step.init(), tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz")
  before = jax.tree.map(np.asarray, nnx.state(module, nnx.Param))
  runner = loaded.apply_fn(module)
  assert runner.fast_layers == []  # planned at the first call
  runner(x)
  assert runner.fast_layers == loaded.fast_layers == ["head/kernel", "layers/0/kernel"]
  assert all(sub.dot_general is jax.lax.dot_general
             for _, sub in nnx.iter_modules(module) if isinstance(sub, nnx.Linear))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(module, nnx.Param), before)
  other = _nnx_model("mlp", in_features=40, hidden=(16,), num_classes=10)
  with pytest.raises(ValueError, match="do not match the export.*layers/0/kernel"):
    loaded.apply_fn(other)


class _Attn(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=16, qkv_features=32,
                                       decode=False, rngs=rngs)

  def __call__(self, x):
    return self.attn(x)


@pytest.mark.parametrize("transform", ["low_rank", "quantize",
                                       pytest.param("prune_neuron", marks=pytest.mark.slow)])
def test_attention_kernels_export_in_their_real_matrix_view(transform, tmp_path):
  """q/k/v kernels (in, heads, head_dim) are stored as their (in, heads*head_dim) matrix:
  low-rank factors of that matrix, per-(head, head_dim) scales; decoding transposes back."""
  module = _Attn(nnx.Rngs(0))
  t = {"low_rank": lambda: vj.low_rank(4),
       "quantize": lambda: vj.quantize(4),
       "prune_neuron": lambda: vj.prune(0.75, granularity="neuron")}[transform]()
  step = vj.make_train_step(module, t, vj.linear_vanish(0))
  state = step.init()
  vj.export(step, state, tmp_path / "m.npz")
  loaded = vj.load_compressed(tmp_path / "m.npz")
  cparams = step.compressed_params(state).to_pure_dict()
  flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded.params()))
  for path, ref in jax.tree_util.tree_leaves_with_path(cparams):
    np.testing.assert_allclose(flat_loaded[path], ref, rtol=1e-6, atol=1e-6)
  manifest, _ = export_format.read(tmp_path / "m.npz")
  query = next(leaf for leaf in manifest["leaves"] if leaf["path"] == "attn/query/kernel")
  assert query["format"].get("in_axes") == [0]
  out = next(leaf for leaf in manifest["leaves"] if leaf["path"] == "attn/out/kernel")
  assert "in_axes" not in out["format"]  # (heads, head_dim, out): Flax's default view
  if transform == "low_rank":
    assert query["format"]["kind"] == "low_rank"
    assert query["compressed_bytes"] == 4 * (16 + 32) * 4
  else:
    assert query["format"]["kind"] == "coded"
    assert query["compressed_bytes"] < query["dense_bytes"] / 2
  x = np.random.RandomState(1).rand(2, 3, 16).astype(np.float32)
  reference = nnx.clone(module)
  nnx.update(reference, step.compressed_params(state))
  for decode in ("once", "on_the_fly"):
    np.testing.assert_allclose(loaded.apply(module, x, decode=decode), reference(x),
                               rtol=1e-5, atol=1e-5, err_msg=decode)
