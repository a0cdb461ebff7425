"""Transforms: exact counts, levels, ranks, straight-through gradients, selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vcon_jax as vj


def _params(seed=0):
  rng = np.random.RandomState(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.randn(12, 8), jnp.float32),
                "bias": jnp.asarray(rng.randn(8), jnp.float32)},
      "conv": {"kernel": jnp.asarray(rng.randn(3, 3, 4, 6), jnp.float32)},
      "embed": {"embedding": jnp.asarray(rng.randn(10, 8), jnp.float32)},
  }


@pytest.mark.parametrize("granularity,group,expected_per_group", [
    ("layer", None, None), ("neuron", None, None), ("group", 4, None)])
def test_prune_keeps_exact_count(granularity, group, expected_per_group):
  w = jnp.asarray(np.random.RandomState(0).randn(3, 3, 8, 6), jnp.float32)
  mask = np.asarray(vj.ops.magnitude_mask(w, 0.75, granularity, group))
  mat = mask.reshape(-1, 6)
  if granularity == "layer":
    assert mask.sum() == mask.size - round(0.75 * mask.size)
  elif granularity == "neuron":
    np.testing.assert_array_equal(mat.sum(0), np.full(6, 72 - 54))
  else:
    np.testing.assert_array_equal(mat.T.reshape(-1, 4).sum(1), 1)


def test_prune_n_m_pattern():
  t = vj.prune(n=2, m=4)
  p = {"kernel": jnp.asarray(np.random.RandomState(0).randn(16, 5), jnp.float32)}
  c = vj.compress(t, p, t.init(p))["kernel"]
  groups = (np.asarray(c) != 0).T.reshape(-1, 4)
  np.testing.assert_array_equal(groups.sum(1), 2)


def test_prune_keeps_largest_magnitudes():
  w = jnp.asarray([[0.1, -5.0], [3.0, 0.2], [-0.3, 0.05]], jnp.float32)
  t = vj.prune(sparsity=0.5, where="kernel")
  c = np.asarray(vj.compress(t, {"kernel": w}, t.init({"kernel": w}))["kernel"])
  np.testing.assert_array_equal(c != 0, [[False, True], [True, False], [True, False]])


def test_binarize_two_values_per_layer():
  p = _params()
  t = vj.binarize()
  c = vj.compress(t, p, t.init(p))
  k = np.asarray(c["dense"]["kernel"])
  assert len(np.unique(k)) == 2
  np.testing.assert_allclose(np.unique(np.abs(k)), np.abs(np.asarray(p["dense"]["kernel"])).mean(),
                             rtol=1e-6)
  assert np.all(np.sign(k) == np.where(np.asarray(p["dense"]["kernel"]) >= 0, 1, -1))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_levels_per_channel(bits):
  p = _params()
  t = vj.quantize(bits=bits)
  c = np.asarray(vj.compress(t, p, t.init(p))["conv"]["kernel"]).reshape(-1, 6)
  for j in range(6):
    assert len(np.unique(c[:, j])) <= 2 ** bits
  if bits >= 2:  # the largest magnitude is represented exactly
    w = np.asarray(p["conv"]["kernel"]).reshape(-1, 6)
    np.testing.assert_allclose(np.abs(c).max(0), np.abs(w).max(0), rtol=1e-6)


def test_low_rank_rank_and_svd_init():
  p = _params()
  t = vj.low_rank(rank=3)
  s = t.init(p)
  c = vj.compress(t, p, s)
  k = np.asarray(c["dense"]["kernel"])
  assert np.linalg.matrix_rank(k, tol=1e-4) == 3
  w = np.asarray(p["dense"]["kernel"], np.float64)
  u, sv, vt = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(k, (u[:, :3] * sv[:3]) @ vt[:3], atol=1e-5)
  assert s.trainable["conv/kernel"]["a"].shape == (36, 3)
  assert s.trainable["conv/kernel"]["b"].shape == (3, 6)


ALL = {
    "prune": lambda: vj.prune(sparsity=0.7),
    "prune_neuron": lambda: vj.prune(sparsity=0.5, granularity="neuron"),
    "prune_nm": lambda: vj.prune(n=1, m=4),
    "prune_interval": lambda: vj.prune(sparsity=0.7, update_every=3),
    "binarize": vj.binarize,
    "quantize": lambda: vj.quantize(bits=3),
    "low_rank": lambda: vj.low_rank(rank=2),
    "chain": lambda: vj.chain(vj.prune(sparsity=0.5), vj.quantize(bits=4)),
    "chain_lr": lambda: vj.chain(vj.low_rank(rank=2), vj.quantize(bits=4)),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("chain", "prune_neuron") else n for n in sorted(ALL)])
@pytest.mark.parametrize("jit", [False, True])
def test_blend_endpoints(name, jit):
  p = _params()
  t = ALL[name]()
  s = t.init(p)
  apply = jax.jit(t.apply, static_argnames=("exact",)) if jit else t.apply
  dense = apply(p, s, jnp.float32(1.0), 0, exact=False)
  jax.tree.map(np.testing.assert_array_equal, dense, p)
  exact = vj.compress(t, p, s)
  train0 = apply(p, s, jnp.float32(0.0), 0, exact=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), train0, exact)
  half = apply(p, s, jnp.float32(0.5), 0, exact=True)
  expect = jax.tree.map(lambda w, c: 0.5 * w + 0.5 * c, p, exact)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), half, expect)
  # Untouched leaves stay bit-identical.
  np.testing.assert_array_equal(exact["dense"]["bias"], p["dense"]["bias"])
  np.testing.assert_array_equal(exact["embed"]["embedding"], p["embed"]["embedding"])


@pytest.mark.parametrize("name", ["prune", "prune_nm", "binarize", "quantize", "chain"])
def test_straight_through_gradient(name):
  p = _params()
  t = ALL[name]()
  s = t.init(p)
  g = jax.tree.map(lambda x: jnp.asarray(np.random.RandomState(3).randn(*x.shape), x.dtype), p)

  def f(params):
    out = t.apply(params, s, jnp.float32(0.3), 0, exact=False)
    return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)))

  grads = jax.grad(f)(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grads, g)


def test_low_rank_gradient_split():
  p = {"kernel": jnp.asarray(np.random.RandomState(0).randn(6, 5), jnp.float32)}
  t = vj.low_rank(rank=2)
  s = t.init(p)
  g = jnp.ones((6, 5))

  def f(params, trainable):
    out = t.apply(params, vj.TransformState(trainable, s.aux), jnp.float32(0.25), 0,
                  exact=False)
    return jnp.sum(out["kernel"] * g)

  gw, gf = jax.grad(f, argnums=(0, 1))(p, s.trainable)
  np.testing.assert_allclose(gw["kernel"], 0.25 * g)
  np.testing.assert_allclose(gf["kernel"]["a"], 0.75 * g @ s.trainable["kernel"]["b"].T,
                             rtol=1e-5)


def test_default_selection_and_regex():
  p = _params()
  t = vj.prune(sparsity=0.5)
  assert t.select("dense/kernel", p["dense"]["kernel"])
  assert not t.select("dense/bias", p["dense"]["bias"])
  assert not t.select("embed/embedding", p["embed"]["embedding"])
  t = vj.prune(sparsity=0.5, where=r"conv")
  assert t.select("conv/kernel", p["conv"]["kernel"])
  assert not t.select("dense/kernel", p["dense"]["kernel"])
  t = vj.prune(sparsity=0.5, exclude=r"conv")
  assert not t.select("conv/kernel", p["conv"]["kernel"])


def test_chain_with_member_schedules():
  p = _params()
  t = vj.chain(vj.prune(sparsity=0.5), vj.quantize(bits=4),
               schedules=[vj.constant(0.0), vj.constant(1.0)])
  s = t.init(p)
  out = t.apply(p, s, jnp.float32(0.7), 0, exact=True)
  only_prune = vj.prune(sparsity=0.5)
  expect = vj.compress(only_prune, p, only_prune.init(p))
  jax.tree.map(np.testing.assert_array_equal, out, expect)


def test_fixed_and_interval_masks_are_state():
  p = {"kernel": jnp.asarray(np.random.RandomState(0).randn(10, 10), jnp.float32)}
  t = vj.prune(sparsity=0.5, update_every=None)
  s = t.init(p)
  moved = {"kernel": -p["kernel"] * jnp.linspace(0, 2, 100).reshape(10, 10)}
  same = t.refresh(moved, s, jnp.int32(4))
  np.testing.assert_array_equal(same.aux["kernel"], s.aux["kernel"])
  t2 = vj.prune(sparsity=0.5, update_every=2)
  s2 = t2.init(p)
  kept = t2.refresh(moved, s2, jnp.int32(3))
  np.testing.assert_array_equal(kept.aux["kernel"], s2.aux["kernel"])
  fresh = t2.refresh(moved, s2, jnp.int32(4))
  np.testing.assert_array_equal(fresh.aux["kernel"], vj.ops.magnitude_mask(moved["kernel"], 0.5))


BAD = [
    (lambda: vj.prune(sparsity=1.0), "sparsity must be a number in \\[0, 1\\)"),
    (lambda: vj.prune(sparsity=-0.1), "sparsity"),
    (lambda: vj.prune(n=3, m=2), "n <= m"),
    (lambda: vj.prune(n=2), "both n and m"),
    (lambda: vj.prune(sparsity=0.5, n=2, m=4), "either sparsity or n and m"),
    (lambda: vj.prune(sparsity=0.5, granularity="row"), "granularity must be one of"),
    (lambda: vj.prune(sparsity=0.5, granularity="group"), "group_size"),
    (lambda: vj.prune(sparsity=0.5, update_every=0), "update_every"),
    (lambda: vj.prune(sparsity=0.5, where="(unclosed"), "not a valid regular expression"),
    (lambda: vj.quantize(bits=0), "bits must be an integer >= 1"),
    (lambda: vj.quantize(bits=17), "bits must be an integer >= 1 and <= 16"),
    (lambda: vj.quantize(bits=2.5), "bits"),
    (lambda: vj.low_rank(rank=0), "rank must be an integer >= 1"),
    (lambda: vj.chain(), "at least one"),
    (lambda: vj.chain(vj.binarize(), "x"), "member 1"),
    (lambda: vj.chain(vj.binarize(), schedules=[None, None]), "one schedule"),
    (lambda: vj.linear_vanish(-1), "transition_steps must be an integer >= 0"),
    (lambda: vj.polynomial_ramp(0.9, 10, 5), "end_step must be >= begin_step"),
]


@pytest.mark.parametrize("build,match", BAD)
def test_bad_arguments_raise_at_build(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("build,match", [
    (lambda: vj.prune(sparsity=0.5, where="nothing_here"), "selects no parameter"),
    (lambda: vj.low_rank(rank=9), "rank=9 is larger than leaf conv/kernel"),
    (lambda: vj.prune(n=2, m=5), "m=5 must divide"),
])
def test_bad_selection_raises_at_init(build, match):
  with pytest.raises(ValueError, match=match):
    build().init(_params())


@pytest.mark.parametrize("gradient,expected", [("straight_through", 1.0), ("true", 2.0)])
def test_leaf_rule_declares_its_gradient(gradient, expected):
  """A rule returns only C(w); the library applies the gradient it declares."""
  rule = vj.LeafRule(init=lambda path, w, *, axes: (None, None),
                     compress=lambda w, *, axes, trainable, aux, count: 2.0 * w,
                     refresh=None,
                     describe=lambda w, *, axes, trainable, count: vj.LeafSpec("x2"),
                     gradient=gradient)
  t = vj.leafwise(rule, name="double")
  params = {"Dense_0": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
  state = t.init(params)
  out = t.apply(params, state, 0.0)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], 2.0 * params["Dense_0"]["kernel"])
  g = jax.grad(lambda p: t.apply(p, state, 0.0)["Dense_0"]["kernel"].sum())(params)
  np.testing.assert_array_equal(g["Dense_0"]["kernel"], np.full((2, 3), expected))
  with pytest.raises(ValueError, match="gradient must be one of"):
    vj.leafwise(rule._replace(gradient="ste"), name="double")
