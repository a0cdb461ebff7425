"""Low-rank factorisation with trainable factors initialised from the truncated SVD."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from vcon_jax import _paths, _validate
from vcon_jax._spec import LeafSpec
from vcon_jax._selection import Selection
from vcon_jax._transform import LeafRule, Transform, leafwise


def svd_factors(w, rank: int, in_axes: tuple[int, ...] | None = None):
  """``(A, B)`` with ``A @ B`` the best rank-``rank`` approximation of ``w`` as a matrix.

  The matrix is ``w``'s ``(fan_in, fan_out)`` view over ``in_axes`` (its input axes;
  ``None``: every axis but the last). The singular values are split evenly
  (``A = U sqrt(S)``, ``B = sqrt(S) V^T``) so the two factors have matching scale, which
  keeps their gradients balanced.
  """
  mat = _paths.to_matrix(np.asarray(w, dtype=np.float64), in_axes)
  u, s, vt = np.linalg.svd(mat, full_matrices=False)
  root = np.sqrt(s[:rank])
  a = (u[:, :rank] * root).astype(w.dtype)
  b = (root[:, None] * vt[:rank]).astype(w.dtype)
  return jnp.asarray(a), jnp.asarray(b)


def low_rank(rank: int | Callable = 16, *, max_rank: int | None = None,
             selection: Selection | None = None, where: str | None = None,
             exclude: str | None = None,
             in_axes: _paths.InAxes = None, include_non_kernels: bool = False,
             stacked: dict | None = None) -> Transform:
  r"""Low-rank factorisation ``W ~ A B`` with trained factors.

  Each selected kernel, viewed as the ``(fan_in, fan_out)`` matrix of its linear map (input
  axes first: every axis but the last for Dense and Conv, ``in`` for an attention
  ``(in, heads, head_dim)`` kernel, ``(heads, head_dim)`` for its ``out`` kernel), gets
  factors ``A`` (fan_in x r) and ``B`` (r x fan_out) from its truncated SVD; ``A @ B`` is
  reshaped back to the kernel's layout. The factors live in ``TransformState.trainable``
  and are optimised with the params. The gradient is the true one: ``W`` receives ``beta``
  times the blended weight's gradient, the factors the rest; once beta is 0 ``W`` no
  longer matters.

  .. math:: \bar W = \beta W + (1 - \beta) A B

  Args:
    rank: the rank ``r >= 1`` (at most ``min(fan_in, fan_out)`` of every selected leaf), or
      a schedule ``count -> rank`` for the gradual-rank baseline: factors are then sized
      ``max_rank`` (default: full rank of each leaf) and columns beyond the current rank
      are masked out (the SVD orders them by importance). A schedule is checked at a few
      counts when ``low_rank`` is called (its rounded values must be >= 1).
    max_rank: factor size when ``rank`` is a schedule.
    selection: which leaves, and how each is read (:class:`vcon_jax.Selection`); default:
      the linear maps a trace finds (``make_train_step(example=)``), else Flax's
      ``kernel`` leaves by names, refusing what the names cannot settle.
    where, exclude, in_axes, include_non_kernels, stacked: deprecated (0.3); the fields of
      :class:`vcon_jax.Selection` of the same names.

  >>> import vcon_jax as vj
  >>> t = vj.low_rank(rank=16)
  """
  scheduled = callable(rank)
  rank = _validate.int_or_schedule("rank", rank, 1)
  max_rank = _validate.as_int("max_rank", max_rank, 1, allow_none=True)

  def init(path, w, *, axes):
    fan_in, fan_out = _paths.matricize_shape(w.shape, axes)
    allowed = min(fan_in, fan_out)
    r = (max_rank or allowed) if scheduled else rank
    if r > allowed:
      name = "max_rank" if scheduled else "rank"
      raise ValueError(f"{name}={r} is larger than leaf {path} of shape {tuple(w.shape)} "
                       f"allows (at most min(fan_in, fan_out) = {allowed}); choose a "
                       f"smaller rank or exclude the leaf.")
    a, b = svd_factors(w, r, axes)
    return {"a": a, "b": b}, None

  def compress(w, *, axes, trainable, aux, count):
    a, b = trainable["a"], trainable["b"]
    if scheduled:
      keep = jnp.arange(a.shape[1]) < jnp.round(jnp.asarray(rank(count), jnp.float32))
      a = a * keep.astype(a.dtype)
    return _paths.from_matrix(a @ b, w.shape, axes)

  def describe(w, *, axes, trainable, count):
    return LeafSpec("low_rank", rank=int(jnp.round(rank(count))) if scheduled else rank,
                    factors=(trainable["a"], trainable["b"]))

  return leafwise(LeafRule(init, compress, None, describe, needs_axes=True, gradient="true"),
                  name="low_rank", selection=selection, where=where, exclude=exclude,
                  in_axes=in_axes, include_non_kernels=include_non_kernels, stacked=stacked)
