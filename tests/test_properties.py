"""Property tests (hypothesis): the transforms' guarantees over random shapes and dtypes.

Shapes: 1-D leaves (biases; not selected by default, so selected here with
``include_non_kernels=True``), dense ``(fan_in, fan_out)`` matrices and 4-D conv kernels
``(kh, kw, cin, cout)``, with odd sizes. Values: integer-valued weights (many exact ties in magnitude, zeros), arbitrary
finite float32s, or magnitudes spread over 12 decades (outliers next to tiny weights);
dtypes float32 and bfloat16. Properties:

- pruning (layer / neuron / group granularity, and n:m) keeps exactly
  ``L - round(sparsity * L)`` of every group (``n`` of every ``m``), and the kept ones are
  the largest magnitudes, ties broken towards the lower index (a stable-sort reference);
- binarize gives at most two values per layer, exactly ``+-mean|W|``;
- k-bit quantize gives at most ``2**k - 1`` levels per output channel (symmetric uniform:
  integers ``-L..L`` times the channel's scale, ``L = 2**(k-1) - 1``), within half a step
  of ``W``; ``bits=1`` gives two;
- low rank: the compressed matrix has numerical rank ``<= r`` and is the best rank-r
  approximation (Eckart-Young) at init;
- ``apply(params, state, beta, count, exact)``: ``beta = 1`` returns the dense params and
  ``beta = 0`` the compressed ones, bit for bit, for ``exact`` True and False (the training
  view at ``beta = 0`` is checked in every transform's test); other ``beta`` blend; leaves
  not selected are untouched;
- gradients pass straight through prune / quantize / binarize (``d apply / d W = I``), and
  split ``beta`` / ``1 - beta`` between ``W`` and the factors for low rank;
- the train step (a Linen MLP with dropout) is deterministic for a seed: two fresh runs
  give bit-identical params and transform state, also from a separately built step; the
  seed reaches dropout.

Examples are derandomized (``derandomize=True``, no example database), so CI runs the same
examples every time. Runtime of this file (``pytest -q tests/test_properties.py``, the two
forced host devices of conftest.py): 40 s of CPU time, 52 s wall on a 2-core machine that
was also running other jobs (load ~5); most of it is XLA compiling each new shape and
config (~0.3-0.5 s per pruning example, ~2 s per train step), hence the small
``max_examples``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import vcon_jax as vj
from vcon_jax import _paths


# The leaf under test, selected whatever its number of axes (1-D leaves are not kernels).
SEL = {"selection": vj.Selection(where="^conv/kernel$", include_non_kernels=True)}


def props(max_examples):
  return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
SHAPES_1D = st.tuples(st.integers(1, 33))
SHAPES_2D = st.tuples(st.integers(1, 13), st.integers(1, 9))
SHAPES_4D = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5),
                      st.integers(1, 5))
SHAPES = st.one_of(SHAPES_1D, SHAPES_2D, SHAPES_4D)

INT_VALUES = st.integers(-3, 3).map(float)  # ties in magnitude, zeros
FLOAT_VALUES = st.floats(-8.0, 8.0, width=32, allow_subnormal=False)
# Magnitudes over 12 decades: outliers next to tiny weights (stops short of the float32
# subnormals, where XLA:CPU flushes a per-channel scale to zero).
WIDE_VALUES = st.builds(lambda sign, e: sign * 2.0 ** e, st.sampled_from([-1.0, 1.0]),
                        st.floats(-20.0, 20.0))


@st.composite
def arrays(draw, shape, dtype):
  """A float32 array of ``shape`` with integer, plain or wide-range values, as ``dtype``.

  ``shape`` and ``dtype`` may be strategies.
  """
  shape = draw(shape) if isinstance(shape, st.SearchStrategy) else shape
  dtype = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
  elements = draw(st.sampled_from([INT_VALUES, FLOAT_VALUES, WIDE_VALUES]))
  x = draw(hnp.arrays(np.float32, shape, elements=elements))
  return jnp.asarray(x, dtype)


@st.composite
def leaves(draw, shapes=SHAPES):
  return draw(arrays(draw(shapes), draw(DTYPES)))


def f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def params_of(w):
  """``{"conv": {"kernel": w}}`` plus a leaf the transforms must leave alone: under a
  ``conv`` segment, Flax's names settle every layout drawn here (``(in, out)``, and
  ``(kh, kw, in, out)``: every axis but the last is an input)."""
  return {"conv": {"kernel": w}, "other": jnp.arange(3, dtype=jnp.float32)}


def check_outputs(p, out, train0):
  """The selected leaf keeps dtype and shape, others are untouched, and the training view
  at beta = 0 (``exact=False``, straight-through) holds exactly the compressed values."""
  np.testing.assert_array_equal(out["other"], p["other"])
  k, w = out["conv"]["kernel"], p["conv"]["kernel"]
  assert k.dtype == w.dtype and k.shape == w.shape
  np.testing.assert_array_equal(f32(train0["conv"]["kernel"]), f32(out["conv"]["kernel"]))


def compressed(t, w):
  """``compress(t, params_of(w))``'s kernel as float32 numpy, checked by ``check_outputs``."""
  p = params_of(w)
  s = t.init(p)
  out, train0 = jax.jit(lambda p, s: (vj.compress(t, p, s),
                                      t.apply(p, s, jnp.float32(0.0), 0, exact=False)))(p, s)
  check_outputs(p, out, train0)
  return f32(out["conv"]["kernel"])


def rows_of(x, granularity, group_size=None):
  """The groups a threshold is taken over, as rows (reference, from the README's layout)."""
  fan_in, fan_out = _paths.matricize_shape(x.shape)
  if granularity == "layer":
    return x.reshape(1, -1)
  cols = x.reshape(fan_in, fan_out).T  # one row per output unit, its inputs in order
  return cols if granularity == "neuron" else cols.reshape(-1, group_size)


def reference_mask_rows(scores, k):
  """The ``k`` largest of each row by a stable sort: lower index first among ties."""
  out = np.zeros(scores.shape, bool)
  for i, row in enumerate(scores):
    out[i, np.argsort(-row, kind="stable")[:k]] = True
  return out


def divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------- pruning
def prune_outputs(t, w, mask_args):
  """One jit: ``compress`` through the transform, and ``magnitude_mask`` with the sparsity
  as a Python number and as a traced float32 (the schedule path)."""
  p = params_of(w)
  s = t.init(p)
  sparsity, rest = mask_args[0], mask_args[1:]

  @jax.jit
  def run(p, s, traced_sparsity):
    return (vj.compress(t, p, s), t.apply(p, s, jnp.float32(0.0), 0, exact=False),
            vj.ops.magnitude_mask(p["conv"]["kernel"], sparsity, *rest),
            vj.ops.magnitude_mask(p["conv"]["kernel"], traced_sparsity, *rest))

  out, train0, mask, traced_mask = run(p, s, jnp.float32(0.0 if sparsity is None
                                                         else sparsity))
  check_outputs(p, out, train0)
  assert mask.shape == w.shape and mask.dtype == jnp.bool_
  return f32(out["conv"]["kernel"]), np.asarray(mask), np.asarray(traced_mask)


@pytest.mark.slow
@props(20)
@given(data=st.data())
def test_prune_keeps_exact_count_per_group(data):
  w = data.draw(leaves())
  fan_in, _ = _paths.matricize_shape(w.shape)
  granularity = data.draw(st.sampled_from(["layer", "neuron", "group"]))
  group_size = data.draw(st.sampled_from(divisors(fan_in))) if granularity == "group" else None
  sparsity = data.draw(st.one_of(st.sampled_from([0.0, 0.5, 0.25, 0.75]),
                                 st.floats(0.0, 0.99)))
  t = vj.prune(sparsity=sparsity, granularity=granularity, group_size=group_size, **SEL)
  c, mask, traced_mask = prune_outputs(t, w, (sparsity, granularity, group_size))

  scores = rows_of(np.abs(f32(w)), granularity, group_size)
  length = scores.shape[1]
  keep = length - round(sparsity * length)  # sparsity = the fraction zeroed, rounded
  rows = rows_of(mask, granularity, group_size)
  np.testing.assert_array_equal(rows.sum(1), keep)
  np.testing.assert_array_equal(rows, reference_mask_rows(scores, keep))
  np.testing.assert_array_equal(c, np.where(mask, f32(w), 0.0))
  # A sparsity schedule (traced float32) at this value prunes the same weights.
  np.testing.assert_array_equal(traced_mask, mask)


@props(12)
@given(data=st.data())
def test_prune_n_m_keeps_n_of_every_m(data):
  m = data.draw(st.integers(1, 6), label="m")
  n = data.draw(st.integers(1, m), label="n")  # n = 0 is refused at build time
  dtype = data.draw(DTYPES)
  kind = data.draw(st.sampled_from(["dense", "conv"]))
  fan_out = data.draw(st.integers(1, 7))
  if kind == "dense":
    shape = (m * data.draw(st.integers(1, 4)), fan_out)
  else:  # the n:m groups run along the flattened (kh, kw, cin) input axis
    shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)),
             m * data.draw(st.integers(1, 2)), fan_out)
  w = data.draw(arrays(shape, dtype))
  t = vj.prune(n=n, m=m, **SEL)
  c, mask, _ = prune_outputs(t, w, (None, "group", m, n))
  groups = rows_of(mask, "group", m)
  np.testing.assert_array_equal(groups.sum(1), n)
  np.testing.assert_array_equal(
      groups, reference_mask_rows(rows_of(np.abs(f32(w)), "group", m), n))
  np.testing.assert_array_equal(c, np.where(mask, f32(w), 0.0))


@props(10)
@given(w=arrays(SHAPES_1D, DTYPES), m=st.integers(2, 8))
def test_prune_n_m_on_1d_leaf_is_a_clear_error(w, m):
  # A 1-D leaf is one input per output unit (fan_in = 1): m > 1 cannot divide it.
  t = vj.prune(n=1, m=m, **SEL)
  with pytest.raises(ValueError, match=rf"m={m} must divide the input size"):
    t.init(params_of(w))


# ------------------------------------------------------------------------ quantisation
@props(20)
@given(w=leaves())
def test_binarize_two_values_plus_minus_mean(w):
  c = compressed(vj.binarize(**SEL), w)
  x = f32(w)
  assert len(np.unique(c)) <= 2
  scale = np.abs(c).max()
  assert len(np.unique(np.abs(c))) == 1  # exactly +-scale, no zeros unless scale is 0
  rtol = 1e-4 if w.dtype == jnp.float32 else 2 ** -8  # float32 sums of up to 225 values
  np.testing.assert_allclose(scale, np.abs(x.astype(np.float64)).mean(), rtol=rtol, atol=0)
  np.testing.assert_array_equal(c, np.where(x >= 0, scale, -scale))


@props(30)
@given(w=leaves(), bits=st.integers(1, 8), per_channel=st.booleans())
def test_quantize_levels_per_channel(w, bits, per_channel):
  c = compressed(vj.quantize(bits=bits, per_channel=per_channel, **SEL), w)
  x = f32(w)
  # Channels: the last axis of a kernel; a 1-D leaf (or per_channel=False) has one scale.
  channelwise = per_channel and w.ndim > 1
  cm = c.reshape(-1, w.shape[-1]) if channelwise else c.reshape(-1, 1)
  xm = x.reshape(cm.shape)
  max_levels = 2 if bits == 1 else 2 ** bits - 1
  for j in range(cm.shape[1]):
    assert len(np.unique(cm[:, j])) <= max_levels
  if bits == 1:  # sign times the channel's mean magnitude
    mean = np.abs(cm).max(0)
    np.testing.assert_array_equal(cm, np.where(xm >= 0, mean, -mean))
    return
  top = 2 ** (bits - 1) - 1
  amax = np.abs(xm).max(0)
  scale = np.where(amax > 0, amax / top, 1.0)
  q = cm / scale
  eps = 1e-6 if w.dtype == jnp.float32 else 2 ** -8
  np.testing.assert_allclose(q, np.round(q), atol=eps * top)  # integer multiples of scale
  assert np.all(np.abs(q) <= top * (1 + eps))
  err = np.abs(cm.astype(np.float64) - xm)  # within half a step (plus the dtype's rounding)
  assert np.all(err <= scale / 2 * (1 + eps) + np.abs(xm) * eps)
  # The largest magnitude of each channel is a level itself.
  np.testing.assert_allclose(np.abs(cm).max(0), amax, rtol=1e-6)


# --------------------------------------------------------------------------- low rank
@st.composite
def low_rank_cases(draw):
  w = draw(leaves())
  fan_in, fan_out = _paths.matricize_shape(w.shape)
  return w, draw(st.integers(1, min(fan_in, fan_out)))


@props(20)
@given(case=low_rank_cases())
def test_low_rank_rank_at_most_r(case):
  w, r = case
  c = compressed(vj.low_rank(rank=r, **SEL), w)
  fan_in, fan_out = _paths.matricize_shape(w.shape)
  mat = f32(c).astype(np.float64).reshape(fan_in, fan_out)
  ref = f32(w).astype(np.float64).reshape(fan_in, fan_out)
  sv_ref = np.linalg.svd(ref, compute_uv=False)
  eps = 1e-6 if w.dtype == jnp.float32 else 2 ** -7
  tol = eps * max(1.0, sv_ref[0]) * max(fan_in, fan_out)
  assert np.linalg.matrix_rank(mat, tol=tol) <= r
  # Eckart-Young: at init it is the best rank-r approximation.
  best = np.sqrt(np.sum(sv_ref[r:] ** 2))
  err = np.linalg.norm(ref - mat)
  assert err <= best + 4 * eps * max(1.0, np.linalg.norm(ref))


@props(10)
@given(w=arrays(SHAPES_1D, DTYPES), r=st.integers(2, 5))
def test_low_rank_on_1d_leaf(w, r):
  # A 1-D leaf is a (1, L) matrix: rank 1 reproduces it, a larger rank is a clear error.
  c = compressed(vj.low_rank(rank=1, **SEL), w)
  eps = 1e-6 if w.dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(c, f32(w), rtol=0, atol=eps * np.abs(f32(w)).max())
  with pytest.raises(ValueError, match=rf"rank={r} is larger than leaf conv/kernel"):
    vj.low_rank(rank=r, **SEL).init(params_of(w))


# ------------------------------------------------------------------ blend and gradients
def make_transform(name, w):
  fan_in, fan_out = _paths.matricize_shape(w.shape)
  group = max(d for d in divisors(fan_in) if d <= 4)
  return {
      "prune": lambda: vj.prune(sparsity=0.6, **SEL),
      "prune_neuron": lambda: vj.prune(sparsity=0.5, granularity="neuron", **SEL),
      "prune_nm": lambda: vj.prune(n=1, m=group, **SEL),
      "prune_interval": lambda: vj.prune(sparsity=0.4, update_every=3, **SEL),
      "binarize": lambda: vj.binarize(**SEL),
      "quantize": lambda: vj.quantize(bits=3, **SEL),
      "low_rank": lambda: vj.low_rank(rank=min(2, fan_in, fan_out), **SEL),
      "chain": lambda: vj.chain(vj.prune(sparsity=0.5, **SEL),
                                vj.quantize(bits=4, **SEL)),
  }[name]()


STRAIGHT_THROUGH = ["prune", "prune_neuron", "prune_nm", "prune_interval", "binarize",
                    "quantize", "chain"]


@pytest.mark.slow
@props(16)
@given(w=leaves(), name=st.sampled_from(STRAIGHT_THROUGH + ["low_rank"]),
       exact=st.booleans(), beta=st.floats(0.0, 1.0))
def test_blend_endpoints(w, name, exact, beta):
  t = make_transform(name, w)
  p = params_of(w)
  s = t.init(p)

  @jax.jit
  def run(p, s, betas):
    return [t.apply(p, s, b, 0, exact=exact) for b in betas], vj.compress(t, p, s)

  (dense, zero, mid), comp = run(p, s, (jnp.float32(1.0), jnp.float32(0.0),
                                        jnp.float32(beta)))
  for out, expect in ((dense, p), (zero, comp)):
    assert out["conv"]["kernel"].dtype == w.dtype
    np.testing.assert_array_equal(f32(out["conv"]["kernel"]), f32(expect["conv"]["kernel"]))
    np.testing.assert_array_equal(out["other"], p["other"])
  expect = beta * f32(w).astype(np.float64) + (1 - beta) * f32(comp["conv"]["kernel"])
  scale = np.abs(f32(w)).max() + np.abs(f32(comp["conv"]["kernel"])).max()
  tol = (1e-6 if w.dtype == jnp.float32 else 2 ** -8) * scale
  np.testing.assert_allclose(f32(mid["conv"]["kernel"]), expect, atol=tol, rtol=0)


@pytest.mark.slow
@props(15)
@given(w=leaves(), name=st.sampled_from(STRAIGHT_THROUGH), beta=st.floats(0.0, 1.0))
def test_gradients_pass_straight_through(w, name, beta):
  t = make_transform(name, w)
  p = params_of(w)
  s = t.init(p)
  g = jnp.asarray(np.random.RandomState(w.size).randn(*w.shape), w.dtype)

  @jax.jit
  def grad(p, beta):
    return jax.grad(lambda p: jnp.sum(
        g * t.apply(p, s, beta, 0, exact=False)["conv"]["kernel"]))(p)["conv"]["kernel"]

  np.testing.assert_array_equal(f32(grad(p, jnp.float32(0.0))), f32(g))
  tol = 1e-6 if w.dtype == jnp.float32 else 2 ** -8
  np.testing.assert_allclose(f32(grad(p, jnp.float32(beta))), f32(g), rtol=tol, atol=tol)


@props(10)
@given(case=low_rank_cases(), beta=st.floats(0.0, 1.0))
def test_low_rank_gradient_split(case, beta):
  w, r = case
  w = w.astype(jnp.float32)
  t = vj.low_rank(rank=r, **SEL)
  p = params_of(w)
  s = t.init(p)
  g = jnp.asarray(np.random.RandomState(w.size).randn(*w.shape), jnp.float32)

  def f(p, trainable):
    out = t.apply(p, vj.TransformState(trainable, s.aux), jnp.float32(beta), 0, exact=False)
    return jnp.sum(g * out["conv"]["kernel"])

  gw, gf = jax.jit(jax.grad(f, argnums=(0, 1)))(p, s.trainable)
  fan_in, fan_out = _paths.matricize_shape(w.shape)
  gm = np.asarray(g, np.float64).reshape(fan_in, fan_out)
  a, b = (np.asarray(s.trainable["conv/kernel"][n], np.float64) for n in "ab")
  np.testing.assert_allclose(gw["conv"]["kernel"], beta * np.asarray(g), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(gf["conv/kernel"]["a"], (1 - beta) * gm @ b.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gf["conv/kernel"]["b"], (1 - beta) * a.T @ gm, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- train step
class DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(8)(x))  # fan_in 12 and 8: n:m with m = 4 divides both
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(5)(x)


TRAIN_TRANSFORMS = {
    "prune": lambda: vj.prune(sparsity=0.6),
    "prune_nm": lambda: vj.prune(n=2, m=4),
    "binarize": vj.binarize,
    "quantize": lambda: vj.quantize(bits=3),
    "low_rank": lambda: vj.low_rank(rank=2),
}


def batches_and_params(seed, steps=3):
  model = DropoutMLP()
  rng = np.random.RandomState(seed)
  batches = [{"inputs": rng.randn(8, 12).astype(np.float32), "labels": rng.randint(0, 5, 8)}
             for _ in range(steps)]
  return model, batches, model.init(jax.random.key(seed), batches[0]["inputs"])["params"]


def make_step(model, transform, seed):
  return vj.make_train_step(model, transform, vj.linear_vanish(2), optax.adam(1e-2),
                            seed=seed, train_kwargs={"train": True})


def train_run(step, params, batches, seed=None):
  """A fresh run: a new state from ``params``; the final params and transform state."""
  state = step.init(params, seed=seed)
  for batch in batches:
    state, _ = step(state, batch)
  return jax.device_get((state.params, state.transform_state))


@pytest.mark.slow
@props(3)
@given(name=st.sampled_from(sorted(TRAIN_TRANSFORMS)), seed=st.integers(0, 2 ** 31 - 1))
def test_train_step_deterministic_for_a_seed(name, seed):
  # One compiled step per example (compiling dominates); two runs from fresh states.
  model, batches, params = batches_and_params(seed)
  step = make_step(model, TRAIN_TRANSFORMS[name](), seed)
  first, second = train_run(step, params, batches), train_run(step, params, batches)
  jax.tree.map(np.testing.assert_array_equal, first, second)


@pytest.mark.slow
def test_train_step_fresh_trace_same_result_and_seed_matters():
  # A separately built (traced and compiled) step reproduces the run bit for bit, as a
  # restarted process would; another seed (same data, same init) changes the dropout
  # masks and so the params.
  model, batches, params = batches_and_params(0)
  a, b = (make_step(model, vj.binarize(), seed=0) for _ in range(2))
  runs = [train_run(a, params, batches), train_run(b, params, batches)]
  jax.tree.map(np.testing.assert_array_equal, *runs)
  other = train_run(a, params, batches, seed=1)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(runs[0][0]),
                                                      jax.tree.leaves(other[0])))
