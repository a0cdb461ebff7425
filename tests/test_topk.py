"""Radix-select top-k: exact against a stable sort, eagerly and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcon_jax import _topk


def _reference(scores, k):
  """Stable descending sort: the k largest, lower index first among ties (-0.0 == 0.0)."""
  out = np.zeros(scores.shape, bool)
  for i, row in enumerate(scores):
    out[i, np.argsort(-row, kind="stable")[:k]] = True
  return out


def _scores(kind, shape, rng):
  if kind == "randn":
    return rng.randn(*shape)
  if kind == "abs":
    return np.abs(rng.randn(*shape))
  if kind == "tied":
    return np.round(rng.randn(*shape), 1)
  if kind == "all_equal":
    return np.full(shape, 0.3)
  if kind == "zeros_and_negative_zeros":
    signed_zero = np.where(rng.rand(*shape) < 0.5, -0.0, 0.0)
    return np.where(rng.rand(*shape) < 0.1, 1.0, signed_zero)
  if kind == "huge_and_tiny":
    return rng.choice([np.inf, 3e38, 1e-45, 1e-38, 0.0, -1e-45, -np.inf], shape)
  raise ValueError(kind)


KINDS = ["randn", "abs", "tied", "all_equal", "zeros_and_negative_zeros", "huge_and_tiny"]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kind", KINDS)
# the fast tier keeps a row ranked in 5 radix passes and a short row ranked directly
@pytest.mark.parametrize("shape", [(1, 100), (5, 17)] + [
    pytest.param(s, marks=pytest.mark.slow) for s in [(3, 64), (2, 1000), (1, 70000)]])
def test_topk_mask_matches_stable_sort(jit, kind, shape):
  scores = _scores(kind, shape, np.random.RandomState(len(kind) + shape[1])).astype(
      np.float32)
  fn = jax.jit(_topk.topk_mask, static_argnums=1) if jit else _topk.topk_mask
  length = shape[1]
  for k in sorted({0, 1, length // 3, length - 1, length}):
    mask = np.asarray(fn(jnp.asarray(scores), k))
    np.testing.assert_array_equal(mask, _reference(scores, k), err_msg=f"k={k}")


@pytest.mark.parametrize("k", [0, 1, 250, 499, 500])
def test_topk_mask_traced_k(k):
  scores = np.round(np.random.RandomState(3).randn(4, 500), 1).astype(np.float32)
  mask = jax.jit(_topk.topk_mask)(jnp.asarray(scores), jnp.int32(k))
  np.testing.assert_array_equal(np.asarray(mask), _reference(scores, k))


def test_order_keys_preserve_float_order():
  values = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf],
                    np.float32)
  keys = np.asarray(_topk.order_keys(jnp.asarray(values))).astype(np.int64)
  assert np.all(np.diff(keys[[0, 1, 2, 3, 5, 6, 7, 8, 9]]) > 0)
  assert keys[4] == keys[5]  # -0.0 ties with 0.0


def test_digits_cover_all_bits_in_few_passes():
  assert _topk._digit_widths(32, 2 ** 20) == [16, 16]
  assert sum(_topk._digit_widths(32, 1024)) == 32
  assert len(_topk._digit_widths(32, 1024)) == 4
  assert sum(_topk._digit_widths(11, 1000)) == 11
