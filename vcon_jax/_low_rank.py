"""Low-rank factorisation with trainable factors initialised from the truncated SVD."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from vcon_jax import _paths
from vcon_jax._spec import LeafSpec
from vcon_jax._transform import LeafRule, Transform, leafwise


def svd_factors(w, rank: int):
  """``(A, B)`` with ``A @ B`` the best rank-``rank`` approximation of ``w`` as a matrix.

  The singular values are split evenly (``A = U sqrt(S)``, ``B = sqrt(S) V^T``) so the two
  factors have matching scale, which keeps their gradients balanced.
  """
  fan_in, fan_out = _paths.matricize_shape(w.shape)
  mat = np.asarray(w, dtype=np.float64).reshape(fan_in, fan_out)
  u, s, vt = np.linalg.svd(mat, full_matrices=False)
  root = np.sqrt(s[:rank])
  a = (u[:, :rank] * root).astype(w.dtype)
  b = (root[:, None] * vt[:rank]).astype(w.dtype)
  return jnp.asarray(a), jnp.asarray(b)


def low_rank(rank: int | Callable = 16, *, max_rank: int | None = None,
             where: str | None = None, exclude: str | None = None) -> Transform:
  r"""Low-rank factorisation ``W ~ A B`` with trained factors.

  Each selected kernel, viewed as a ``(fan_in, fan_out)`` matrix (all axes but the last are
  inputs), gets factors ``A`` (fan_in x r) and ``B`` (r x fan_out) from its truncated SVD.
  They live in ``TransformState.trainable`` and are optimised with the params. The gradient
  is the true one: ``W`` receives ``beta`` times the blended weight's gradient, the factors
  the rest; once beta is 0 ``W`` no longer matters.

  .. math:: \bar W = \beta W + (1 - \beta) A B

  Args:
    rank: the rank ``r >= 1`` (at most ``min(fan_in, fan_out)`` of every selected leaf), or
      a schedule ``count -> rank`` for the gradual-rank baseline: factors are then sized
      ``max_rank`` (default: full rank of each leaf) and columns beyond the current rank
      are masked out (the SVD orders them by importance).
    max_rank: factor size when ``rank`` is a schedule.
    where, exclude: leaf selection regexes (default: kernels with ``ndim >= 2``).

  >>> import vcon_jax as vj
  >>> t = vj.low_rank(rank=16)
  """
  scheduled = callable(rank)
  if not scheduled and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
    raise ValueError(f"rank must be an integer >= 1 or a schedule, got {rank!r}.")
  if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
    raise ValueError(f"max_rank must be an integer >= 1 or None, got {max_rank!r}.")

  def init(path, w):
    fan_in, fan_out = _paths.matricize_shape(w.shape)
    allowed = min(fan_in, fan_out)
    r = (max_rank or allowed) if scheduled else rank
    if r > allowed:
      name = "max_rank" if scheduled else "rank"
      raise ValueError(f"{name}={r} is larger than leaf {path} of shape {tuple(w.shape)} "
                       f"allows (at most min(fan_in, fan_out) = {allowed}); choose a "
                       f"smaller rank or exclude the leaf.")
    a, b = svd_factors(w, r)
    return {"a": a, "b": b}, None

  def compress(w, factors, aux, count, exact):
    a, b = factors["a"], factors["b"]
    if scheduled:
      keep = jnp.arange(a.shape[1]) < jnp.round(jnp.asarray(rank(count), jnp.float32))
      a = a * keep.astype(a.dtype)
    return (a @ b).reshape(w.shape)

  def describe(w, factors, count):
    return LeafSpec("low_rank", rank=int(jnp.round(rank(count))) if scheduled else rank,
                    factors=(factors["a"], factors["b"]))

  return leafwise(LeafRule(init, compress, None, describe), where=where, exclude=exclude,
                  name="low_rank")
