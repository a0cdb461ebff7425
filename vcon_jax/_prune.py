"""Magnitude pruning: per layer, per output neuron, per group, or n:m.

The mask keeps the largest ``|w|`` of each group, recomputed exactly at every step by
:func:`vcon_jax._topk.topk_mask` (radix select on the float bit pattern: a few histogram
passes over the weights, no sort). Ties at the threshold are broken by index so exactly
``k`` weights are kept per group.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from vcon_jax import _paths, _validate
from vcon_jax._spec import LeafSpec
from vcon_jax._selection import Selection
from vcon_jax._topk import topk_mask
from vcon_jax._transform import LeafRule, Transform, leafwise

GRANULARITIES = ("layer", "neuron", "group")


def _groups(shape, granularity, group_size, in_axes=None):
  """Returns (to_rows, from_rows) reshaping a kernel into (groups, group_len) rows.

  Rows are output units (``neuron``) or blocks of ``group_size`` consecutive inputs of an
  output unit (``group``), with the kernel viewed as its ``(fan_in, fan_out)`` matrix over
  ``in_axes`` (``None``: all axes but the last).
  """
  if granularity == "layer":
    return (lambda x: x.reshape(1, -1)), (lambda r: r.reshape(shape))

  def to_rows(x):
    cols = _paths.to_matrix(x, in_axes).T  # (fan_out, fan_in): one row per output unit
    return cols if granularity == "neuron" else cols.reshape(-1, group_size)

  def from_rows(r):
    fan_in, fan_out = _paths.matricize_shape(shape, in_axes)
    return _paths.from_matrix(r.reshape(fan_out, fan_in).T, shape, in_axes)

  return to_rows, from_rows


def _keep_count(group_len: int, sparsity: Any, n: int | None) -> Any:
  if n is not None:
    return n
  if isinstance(sparsity, (int, float)):
    return group_len - int(round(sparsity * group_len))
  pruned = jnp.round(jnp.asarray(sparsity, jnp.float32) * group_len).astype(jnp.int32)
  return group_len - pruned


def magnitude_mask(w: jax.Array, sparsity: Any, granularity: str = "layer",
                   group_size: int | None = None, n: int | None = None,
                   in_axes: tuple[int, ...] | None = None) -> jax.Array:
  """Boolean mask keeping the largest ``|w|``: ``L - round(sparsity * L)`` per group of ``L``.

  ``round`` is Python's (half to even): ``sparsity`` is the fraction zeroed, rounded.
  ``in_axes``: the input axes of ``w`` for ``"neuron"`` and ``"group"`` (``None``: every
  axis but the last, Flax's Dense / Conv layout).
  """
  to_rows, from_rows = _groups(w.shape, granularity, group_size, in_axes)
  rows = to_rows(jnp.abs(w))
  k = _keep_count(rows.shape[1], sparsity, n)
  return from_rows(topk_mask(rows, k))


def prune(sparsity: float | Callable | None = None, *, granularity: str = "layer",
          group_size: int | None = None, n: int | None = None, m: int | None = None,
          update_every: int | None = 1, selection: Selection | None = None,
          where: str | None = None, exclude: str | None = None,
          in_axes: _paths.InAxes = None, include_non_kernels: bool = False,
          stacked: dict | None = None) -> Transform:
  r"""Magnitude pruning with a straight-through gradient.

  .. math:: C(W) = W \odot M(|W|), \quad \partial C / \partial W := I

  Args:
    sparsity: fraction of weights zeroed per group, a number in ``[0, 1)`` (numpy scalars
      included); or a schedule ``count -> sparsity`` (e.g.
      :func:`vcon_jax.polynomial_ramp`) for gradual pruning, evaluated at a few counts
      when ``prune`` is called and refused if it leaves ``[0, 1)``.
    granularity: ``"layer"`` (one threshold per tensor), ``"neuron"`` (per output unit:
      for a ``(in, heads, head_dim)`` attention kernel one per ``(head, head_dim)`` pair)
      or ``"group"`` (blocks of ``group_size`` consecutive inputs of each output unit).
    group_size: block length for ``granularity="group"``.
    n, m: n:m structured sparsity: keep ``n`` of every ``m`` consecutive inputs of each
      output unit (e.g. ``n=2, m=4``; ``1 <= n <= m``). Exclusive with ``sparsity``.
    update_every: recompute the mask every this many optimiser steps (1: online, as in the
      paper); ``None``: a fixed mask computed once from the initial weights. With values
      above 1 the mask is stored in the transform state and refreshed in ``refresh``.
    selection: which leaves, and how each is read (:class:`vcon_jax.Selection`); default:
      the linear maps a trace finds (``make_train_step(example=)``), else Flax's
      ``kernel`` leaves by names, refusing what the names cannot settle.
    where, exclude, in_axes, include_non_kernels, stacked: deprecated (0.3); the fields of
      :class:`vcon_jax.Selection` of the same names.

  Returns:
    A :class:`Transform`.

  >>> import vcon_jax as vj
  >>> t = vj.prune(sparsity=0.9)
  >>> t = vj.prune(n=2, m=4)
  """
  if (n is None) != (m is None):
    raise ValueError(f"n:m pruning needs both n and m, got n={n!r}, m={m!r}.")
  if n is not None:
    if sparsity is not None:
      raise ValueError(f"Pass either sparsity or n and m, not both (got sparsity="
                       f"{sparsity!r}, n={n!r}, m={m!r}).")
    n = _validate.as_int("n", n, 1)
    m = _validate.as_int("m", m, 1)
    if n > m:
      raise ValueError(f"n:m pruning keeps n of every m weights, so n <= m is required; "
                       f"got n={n}, m={m}.")
    granularity, group_size = "group", m
  else:
    if sparsity is None:
      raise ValueError("prune() needs sparsity in [0, 1) (or a schedule), or n and m.")
    sparsity = _validate.fraction_or_schedule("sparsity", sparsity)
    if granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if granularity == "group":
      group_size = _validate.as_int("group_size", group_size, 1)
  update_every = _validate.as_int("update_every", update_every, 1, allow_none=True)

  def sparsity_at(count):
    return sparsity(count) if callable(sparsity) else sparsity

  def mask_of(w, axes, count):
    return magnitude_mask(lax.stop_gradient(w), sparsity_at(count), granularity,
                          group_size, n, axes)

  stored = update_every != 1

  def init(path, w, *, axes):
    if granularity == "group":
      fan_in, _ = _paths.matricize_shape(w.shape, axes)
      if fan_in % group_size:
        what = f"m={m}" if n is not None else f"group_size={group_size}"
        raise ValueError(f"{what} must divide the input size of every selected leaf; "
                         f"{path} has shape {tuple(w.shape)} (input size {fan_in}).")
    return None, (mask_of(w, axes, 0) if stored else None)

  def compress(w, *, axes, trainable, aux, count):
    mask = mask_of(w, axes, count) if aux is None else aux
    return jnp.where(mask, w, jnp.zeros_like(w))

  def refresh(w, *, axes, trainable, aux, count):
    mask = aux
    if update_every is None:
      return mask
    return lax.cond(count % update_every == 0, lambda: mask_of(w, axes, count),
                    lambda: mask)

  def describe(w, *, axes, trainable, count):
    if n is not None:
      return LeafSpec("prune", sparsity=1.0 - n / m, granularity="group", pattern=(n, m))
    return LeafSpec("prune", sparsity=float(sparsity_at(count)), granularity=granularity)

  return leafwise(LeafRule(init, compress, refresh if stored else None, describe,
                           needs_axes=granularity != "layer"),
                  name="prune", selection=selection, where=where, exclude=exclude,
                  in_axes=in_axes, include_non_kernels=include_non_kernels, stacked=stacked)
