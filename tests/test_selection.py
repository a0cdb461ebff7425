"""What is compressed by default, and along which axes, on Flax models we did not write.

Linen ``MultiHeadDotProductAttention`` + ``Dense``, ``nnx.MultiHeadAttention``, Linen
``DenseGeneral`` and ``Einsum``, and a Conv + BatchNorm model: biases (also the 2-D
``(heads, head_dim)`` attention biases), norms and lookup tables stay bit-identical; the
multi-axis attention kernels are cut along their real input and output axes; layouts
Flax's names do not tell are refused with a message saying how to declare them. Also the
build-time checks of schedules and numbers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax import _paths

HEADS, HEAD_DIM, IN = 2, 8, 12


class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM)(x)
    return nn.Dense(4)(nn.LayerNorm()(x))


class LinenGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral(features=(HEADS, HEAD_DIM))(x)


class LinenEinsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum(shape=(4, IN), einsum_str="bi,oi->bo", use_bias=False)(x)


class LinenConvBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def linen_params(model, x):
  return model.init(jax.random.key(0), x)["params"]


def nnx_attention_params():
  model = nnx.MultiHeadAttention(num_heads=HEADS, in_features=IN,
                                 qkv_features=HEADS * HEAD_DIM, decode=False,
                                 rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param).to_pure_dict()
  rng = np.random.RandomState(1)  # non-zero biases, so a pruned bias would show
  return jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), x.dtype), params)


def randomized(params, seed=1):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), x.dtype), params)


def attention_params():
  """A Linen MHA + Dense model's params (random, non-zero biases) and an NNX MHA's."""
  linen = randomized(linen_params(LinenAttention(), jnp.ones((1, 3, IN))))
  return {"linen": linen, "nnx": nnx_attention_params()}


def flat(tree):
  return dict(_paths.leaf_paths(tree))


def selected(transform, params):
  return sorted(p for p, leaf in _paths.leaf_paths(params) if transform.select(p, leaf))


# ------------------------------------------------------------------ default selection
def test_default_selects_kernels_only_on_attention_models():
  for name, params in attention_params().items():
    chosen = selected(vj.prune(0.9), params)
    assert chosen and all(p.endswith("/kernel") for p in chosen), (name, chosen)
    biases = [p for p in flat(params) if p.endswith("bias")]
    assert any(flat(params)[p].ndim == 2 for p in biases)  # (heads, head_dim) biases exist
    assert not set(chosen) & set(biases)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: vj.prune(0.9), marks=pytest.mark.slow),
    lambda: vj.prune(0.5, granularity="neuron"),
    lambda: vj.prune(n=2, m=4), vj.binarize, lambda: vj.quantize(bits=4),
    lambda: vj.low_rank(4)], ids=["prune", "neuron", "n:m", "binarize", "quantize",
                                  "low_rank"])
def test_biases_norms_untouched_on_attention_models(make):
  for name, params in attention_params().items():
    t = make()
    out = flat(vj.compress(t, params, t.init(params)))
    for path, leaf in flat(params).items():
      if not path.endswith("kernel"):
        np.testing.assert_array_equal(out[path], leaf, err_msg=f"{name} {path}")


@pytest.mark.slow
def test_conv_batchnorm_model():
  model = LinenConvBN()
  variables = model.init(jax.random.key(0), jnp.ones((2, 6, 6, 3)))
  params = randomized(variables["params"])
  t = vj.prune(0.9)
  assert selected(t, params) == ["Conv_0/kernel", "Dense_0/kernel"]
  out = flat(vj.compress(t, params, t.init(params)))
  for path, leaf in flat(params).items():
    if path.endswith("kernel"):
      assert (np.asarray(out[path]) == 0).mean() > 0.85
    else:
      np.testing.assert_array_equal(out[path], leaf)
  # The model still runs on the compressed params with its batch statistics.
  model.apply({**variables, "params": vj.compress(t, params, t.init(params))},
              jnp.ones((2, 6, 6, 3)))


@pytest.mark.parametrize("path,chosen", [
    ("PositionwiseFeedForward_0/Dense_0/kernel", True),
    ("patch_embedding/kernel", True),
    ("TimestepEmbedder/Dense_0/kernel", True),
    ("encoder/position_embeddings/kernel", False),
    ("embed/kernel", False),
    ("Embed_0/embedding", False),
    ("pos_embedding", False),
    ("cls_token", False),
    ("encoder/block/attention/query/bias", False),
    ("LayerNorm_0/scale", False),
    ("Dense_0/bias", False),
])
def test_lookup_tables_excluded_by_whole_segment(path, chosen):
  assert vj.prune(0.5).select(path, jnp.zeros((16, 8))) is chosen


def test_a_four_axis_kernel_not_named_conv_is_refused_without_a_trace():
  # a Conv named patch_embedding, a DenseGeneral (D, 2, N, H), a scanned stack: the same
  # shape of leaf, so names cannot tell
  with pytest.raises(ValueError, match=r"patch_embedding/kernel .*Pass example="):
    vj.prune(0.5).select("patch_embedding/kernel", jnp.zeros((4, 4, 3, 8)))
  assert vj.prune(0.5).select("patch_conv/kernel", jnp.zeros((4, 4, 3, 8)))


def test_default_exclude_is_whole_segment():
  import re
  pattern = re.compile(vj.DEFAULT_EXCLUDE)
  assert pattern.search("Embed_0/embedding") and pattern.search("cls_token")
  assert pattern.search("vit/pos_embedding") and pattern.search("Class_Token")
  assert not pattern.search("patch_embedding/kernel")
  assert not pattern.search("PositionwiseFeedForward_0/Dense_0/kernel")
  assert not pattern.search("TimestepEmbedder/Dense_0/kernel")


def test_where_narrows_the_kernel_set():
  params = {"encoder": {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
                        "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
            "hidden0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
  assert selected(vj.prune(0.5, where="encoder"), params) == ["encoder/Dense_0/kernel"]
  assert selected(vj.low_rank(2, where="hidden"), params) == ["hidden0/kernel"]
  vj.low_rank(2, where="hidden").init(params)  # hidden0/bias is not a candidate
  assert selected(vj.prune(0.5, where="encoder", include_non_kernels=True), params) == [
      "encoder/Dense_0/bias", "encoder/Dense_0/kernel", "encoder/LayerNorm_0/bias",
      "encoder/LayerNorm_0/scale"]
  assert selected(vj.prune(0.5, exclude="Dense"), params) == ["hidden0/kernel"]


def test_readme_example_paths_select():
  params = linen_params(LinenAttention(), jnp.ones((1, 3, IN)))
  assert selected(vj.prune(0.5, where=r"Dense_0/kernel"), params) == ["Dense_0/kernel"]
  with pytest.raises(ValueError, match="selects no parameter.*example="):
    vj.prune(0.5, where=r"params/Dense_0/kernel").init(params)


def test_plain_dict_weight_not_named_kernel_is_refused_naming_example_first():
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"^prune: cannot tell what w .*: its name does not "
                                       r"say.* Pass example="):
    vj.prune(0.5).init(params)
  t = vj.prune(0.5, selection=vj.Selection(include_non_kernels=True))
  assert selected(t, params) == ["w"]


# ------------------------------------------------------------------- multi-axis kernels
@pytest.mark.parametrize("path,shape,axes", [
    ("Dense_0/kernel", (12, 4), (0,)),
    ("MultiHeadDotProductAttention_0/query/kernel", (12, 2, 8), (0,)),
    ("attn/key/kernel", (12, 2, 8), (0,)),
    ("attn/value/kernel", (12, 2, 8), (0,)),
    ("attn/out/kernel", (2, 8, 12), (0, 1)),
    ("Conv_0/kernel", (3, 3, 4, 8), (0, 1, 2)),
    ("convs/2/kernel", (3, 4, 8), (0, 1)),
])
def test_input_axes_inferred(path, shape, axes):
  assert _paths.input_axes(path, shape) == axes
  with pytest.raises(ValueError, match="cannot tell"):  # a conv not named so, or a stack
    _paths.input_axes("patch_proj/kernel", (4, 4, 3, 8))


@pytest.mark.parametrize("path,shape", [
    ("DenseGeneral_0/kernel", (12, 2, 8)),
    ("block/proj/kernel", (12, 2, 8)),
    ("DenseGeneral_0/kernel", (3, 4, 2, 8)),
    ("Einsum_0/kernel", (4, 12)),
])
def test_input_axes_refused_when_ambiguous(path, shape):
  with pytest.raises(ValueError, match=f"cannot tell.*{path}.*in_axes="):
    _paths.input_axes(path, shape)


def _true_map(kernel, n_in):
  k = np.asarray(kernel, np.float64)
  return k.reshape(int(np.prod(k.shape[:n_in])), -1)


def test_low_rank_on_nnx_attention_is_rank_of_true_map():
  params = nnx_attention_params()
  t = vj.low_rank(4)
  state = t.init(params)
  assert state.trainable["query/kernel"]["a"].shape == (IN, 4)
  assert state.trainable["query/kernel"]["b"].shape == (4, HEADS * HEAD_DIM)
  assert state.trainable["out/kernel"]["a"].shape == (HEADS * HEAD_DIM, 4)
  out = vj.compress(t, params, state)
  for name in ("query", "key", "value"):
    k = out[name]["kernel"]
    assert k.shape == (IN, HEADS, HEAD_DIM)
    assert np.linalg.matrix_rank(_true_map(k, 1), tol=1e-4) <= 4
    # the best rank-4 approximation of the true (in, heads * head_dim) map
    w = _true_map(params[name]["kernel"], 1)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(_true_map(k, 1), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
  assert np.linalg.matrix_rank(_true_map(out["out"]["kernel"], 2), tol=1e-4) <= 4


def test_low_rank_in_the_train_step_on_nnx_attention():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=IN,
                                         qkv_features=HEADS * HEAD_DIM, decode=False,
                                         rngs=rngs)
      self.head = nnx.Linear(IN, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(self.attn(x).mean(1))

  step = vj.make_train_step(Model(nnx.Rngs(0)), vj.low_rank(4, exclude="head"),
                            vj.linear_vanish(2), optax.sgd(1e-2))
  state = step.init()
  batch = {"inputs": jnp.ones((2, 3, IN)), "labels": jnp.array([0, 1])}
  for _ in range(3):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  kernel = step.compressed_params(state)["attn"]["query"]["kernel"]
  assert np.linalg.matrix_rank(_true_map(kernel, 1), tol=1e-4) <= 4


def test_per_channel_scales_per_output_unit():
  for name, params in attention_params().items():
    t = vj.quantize(bits=2)  # levels -1, 0, 1 times the unit's scale
    out = flat(vj.compress(t, params, t.init(params)))
    q = [p for p in out if p.endswith("query/kernel")][0]
    c = np.abs(np.asarray(out[q]))  # (in, heads, head_dim)
    scales = c.max(axis=0)  # one per (head, head_dim) pair
    assert len(np.unique(scales)) == HEADS * HEAD_DIM, name
    np.testing.assert_allclose(scales, np.abs(np.asarray(flat(params)[q])).max(axis=0),
                               rtol=1e-6)


def test_neuron_pruning_groups_per_head_and_head_dim():
  params = nnx_attention_params()
  t = vj.prune(0.75, granularity="neuron")
  out = vj.compress(t, params, t.init(params))
  kept = (np.asarray(out["query"]["kernel"]) != 0).sum(axis=0)  # (heads, head_dim)
  np.testing.assert_array_equal(kept, IN - round(0.75 * IN))
  kept_out = (np.asarray(out["out"]["kernel"]) != 0).sum(axis=(0, 1))  # per output unit
  np.testing.assert_array_equal(kept_out, HEADS * HEAD_DIM // 4)


def test_n_m_groups_along_inputs_of_out_kernel():
  params = nnx_attention_params()
  t = vj.prune(n=1, m=4)
  out = vj.compress(t, params, t.init(params))
  k = np.asarray(out["out"]["kernel"]).reshape(HEADS * HEAD_DIM, IN)  # (inputs, outputs)
  np.testing.assert_array_equal((k.T != 0).reshape(IN, -1, 4).sum(-1), 1)


def test_dense_general_refused_then_declared():
  model = LinenGeneral()
  params = randomized(linen_params(model, jnp.ones((1, IN))))
  with pytest.raises(ValueError, match=r"low_rank: cannot tell .*DenseGeneral_0/kernel.*"
                                       r"in_axes="):
    vj.low_rank(4).init(params)
  with pytest.raises(ValueError, match="cannot tell"):
    vj.quantize(bits=4).init(params)
  with pytest.raises(ValueError, match="a stack of"):  # or a scanned stack: never guessed
    vj.prune(0.9).init(params)
  t = vj.low_rank(4, in_axes={"DenseGeneral_0": 1})
  out = vj.compress(t, params, t.init(params))
  assert np.linalg.matrix_rank(_true_map(out["DenseGeneral_0"]["kernel"], 1), tol=1e-4) <= 4
  t = vj.quantize(bits=2, in_axes={r"DenseGeneral_0/kernel$": (0,)})
  c = np.abs(np.asarray(vj.compress(t, params, t.init(params))["DenseGeneral_0"]["kernel"]))
  assert len(np.unique(c.max(axis=0))) == HEADS * HEAD_DIM
  np.testing.assert_array_equal(
      vj.compress(t, params, t.init(params))["DenseGeneral_0"]["bias"],
      params["DenseGeneral_0"]["bias"])


def test_einsum_refused_then_declared():
  params = randomized(linen_params(LinenEinsum(), jnp.ones((2, IN))))
  with pytest.raises(ValueError, match="Einsum"):
    vj.low_rank(2).init(params)
  t = vj.prune(0.5, granularity="neuron", in_axes={"Einsum_0": (1,)})  # kernel (out, in)
  c = np.asarray(vj.compress(t, params, t.init(params))["Einsum_0"]["kernel"])
  np.testing.assert_array_equal((c != 0).sum(axis=1), IN // 2)


@pytest.mark.parametrize("in_axes", [{"x": "1"}, {"x": (0, 0)}, {"x": 3}, ["x"]])
def test_bad_in_axes(in_axes):
  params = {"x": {"kernel": jnp.ones((4, 2, 2))}}
  with pytest.raises(ValueError, match="in_axes"):
    vj.low_rank(1, in_axes=in_axes).init(params)


def test_describe_reports_input_axes():
  params = nnx_attention_params()
  t = vj.low_rank(4)
  state = t.init(params)
  # out kernel (heads, head_dim, out): inputs are every axis but the last, Flax's default
  (d,) = t.describe("out/kernel", params["out"]["kernel"], state)
  assert (d.kind, d.rank, d.in_axes) == ("low_rank", 4, None)
  # query kernel (in, heads, head_dim): one input axis, recorded for export
  (q,) = t.describe("query/kernel", params["query"]["kernel"], state)
  assert (q.kind, q.rank, q.in_axes) == ("low_rank", 4, (0,))
  assert q.factors[0].shape == (IN, 4)
  assert vj.prune(0.5).describe("out/kernel", params["out"]["kernel"], None) == (
      vj.LeafSpec("prune", sparsity=0.5, granularity="layer"),)


@pytest.mark.parametrize("jit", [False, True])
def test_matrix_round_trip(jit):
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  for axes in [(0,), (0, 1), (1,), (1, 3), (0, 1, 2)]:
    f = lambda x, axes=axes: _paths.from_matrix(_paths.to_matrix(x, axes), x.shape, axes)
    f = jax.jit(f) if jit else f
    np.testing.assert_array_equal(f(x), x)
    assert _paths.to_matrix(x, axes).shape == _paths.matricize_shape(x.shape, axes)


# -------------------------------------------------------------------- build-time checks
@pytest.mark.parametrize("schedule,match", [
    (optax.linear_schedule(1e-3, 0.0, 100), "must start at 1 or 0"),
    (vj.constant(5.0), r"must stay in \[0, 1\]"),
    (lambda count: 1.0 - count / 10.0, r"beta\(30\) = -2"),
    (lambda count: jnp.ones(2), "scalar"),
    ("linear", "must be a schedule"),
    (0.5, "must start at 1 or 0"),
])
def test_check_beta_schedule_refuses(schedule, match):
  with pytest.raises(ValueError, match=match):
    vj.check_beta_schedule(schedule)


@pytest.mark.parametrize("schedule", [
    vj.linear_vanish(10), vj.linear_vanish(0), vj.cosine_vanish(5, begin_step=3),
    vj.constant(0.0), vj.constant(1.0), optax.linear_schedule(1.0, 0.0, 100),
    optax.cosine_decay_schedule(1.0, 50), 1.0, np.float32(0.0)])
def test_check_beta_schedule_accepts(schedule):
  assert vj.check_beta_schedule(schedule) is schedule


def test_chain_member_schedules_checked():
  with pytest.raises(ValueError, match=r"chain schedules\[1\] must stay in \[0, 1\]"):
    vj.chain(vj.prune(0.5), vj.quantize(bits=4), schedules=[None, vj.constant(5.0)])
  vj.chain(vj.prune(0.5), vj.quantize(bits=4), schedules=[None, vj.constant(0.5)])


@pytest.mark.parametrize("build,match", [
    (lambda: vj.prune(lambda count: 1.5), r"sparsity must stay in \[0, 1\)"),
    (lambda: vj.prune(vj.polynomial_ramp(1.5, 0, 10)), r"sparsity\(5\) = 1.3125"),
    (lambda: vj.prune(n=0, m=4), "n must be an integer >= 1"),
    (lambda: vj.quantize(bits=32), "bits must be an integer >= 1 and <= 16"),
    (lambda: vj.quantize(bits=lambda count: 0), "bits must stay in"),
    (lambda: vj.low_rank(rank=lambda count: 0.2), "rank must stay >= 1"),
    (lambda: vj.constant("x"), "finite number"),
    (lambda: vj.prune(0.5, include_non_kernels=1), "include_non_kernels"),
])
def test_build_time_errors(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_numpy_scalars_are_numbers():
  p = {"Dense_0": {"kernel": jnp.asarray(np.random.RandomState(0).randn(8, 8), jnp.float32)}}
  for t in [vj.prune(np.float32(0.75)), vj.prune(np.float64(0.75)),
            vj.prune(n=np.int64(1), m=np.int32(4)), vj.quantize(bits=np.int64(4)),
            vj.low_rank(np.int32(2), max_rank=None),
            vj.prune(0.75, granularity="group", group_size=np.int64(4),
                     update_every=np.int64(2))]:
    t.init(p)
  c = vj.compress(vj.prune(np.float32(0.75)), p, vj.prune(0.75).init(p))
  assert int((np.asarray(c["Dense_0"]["kernel"]) != 0).sum()) == 16
  assert float(vj.linear_vanish(np.int64(4))(2)) == 0.5
  assert vj.quantize(bits=16) and vj.quantize(bits=1)


def test_low_precision_kernels_selected_integers_not():
  t = vj.prune(0.5)
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    assert t.select("Dense_0/kernel", jnp.zeros((4, 4), dtype)), dtype
  assert not t.select("Dense_0/kernel", jnp.zeros((4, 4), jnp.int32))


@pytest.mark.parametrize("make", [lambda: vj.quantize(4, include_non_kernels=True),
                                  lambda: vj.prune(0.5, granularity="neuron",
                                                   include_non_kernels=True),
                                  lambda: vj.low_rank(2, include_non_kernels=True)])
def test_an_opted_in_non_kernel_weight_is_not_given_flax_axes(make):
  """Equinox's (out, in) `weight` without a trace: refused in one line that names the
  trace and in_axes=, never taken as (in, out); declaring the axes makes it work."""
  params = {"weight": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match=r"not a Flax kernel.*example=x.*in_axes="):
    make().init(params)


def test_an_opted_in_non_kernel_weight_with_declared_axes():
  params = {"weight": jnp.asarray(np.random.RandomState(0).randn(4, 6))}
  t = vj.quantize(4, include_non_kernels=True, in_axes={"weight": (1,)})  # (out, in)
  c = vj.compress(t, params, t.init(params))["weight"]
  assert max(len(np.unique(row)) for row in np.asarray(c)) <= 15  # a scale per output row
