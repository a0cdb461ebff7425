"""Weight quantisation: binary (the paper's) and k-bit symmetric uniform."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vcon_jax import _paths, _schedules
from vcon_jax._spec import LeafSpec
from vcon_jax._transform import LeafRule, Transform, leafwise


#: Widest bit width: codes fit int16 (export's limit); wider gains nothing over floats.
MAX_BITS = 16


def quantize_values(w: jax.Array, bits: Any, per_channel: bool = True,
                    in_axes: tuple[int, ...] | None = None) -> jax.Array:
  r"""Symmetric uniform quantisation of ``w`` to ``bits`` bits (values, not integers).

  ``bits == 1`` gives ``sign(w) * mean|w|`` (zero counts as positive, so exactly two
  values); ``bits >= 2`` gives ``scale * clip(round(w / scale), -L, L)`` with
  ``L = 2**(bits-1) - 1`` and ``scale = max|w| * (1 / L)`` (the float32 reciprocal). Scales are per output unit when
  ``per_channel`` (the statistics are taken over ``in_axes``, the input axes; ``None``:
  every axis but the last), else per tensor. ``bits`` may be a traced integer.
  """
  x = w.astype(jnp.float32)
  if per_channel and w.ndim > 1:
    axes = tuple(range(w.ndim - 1)) if in_axes is None else tuple(in_axes)
  else:
    axes = None
  ax = jnp.abs(x)
  # The same arithmetic in every context. XLA rewrites ``x / constant`` as
  # ``x * (1 / constant)`` under jit only, and its CPU division is not always correctly
  # rounded: a scale 1 ulp apart moved weights on a rounding tie (``W / s = 3.5``) to
  # another level in a jitted step than in an eager view. So constants are divided on
  # the host (a multiplication by a float32 reciprocal, exact and the same everywhere),
  # and the one division by a per-unit scale has a full-size divisor behind a barrier.
  count = ax.size if axes is None else math.prod(ax.shape[a] for a in axes)
  mean = jnp.sum(ax, axis=axes, keepdims=True) * np.float32(1.0 / count)
  binary = jnp.where(x >= 0, mean, -mean)
  if isinstance(bits, int) and bits == 1:
    return binary.astype(w.dtype)
  if isinstance(bits, int):
    levels = float(max(2 ** (bits - 1) - 1, 1))
    scale = jnp.max(ax, axis=axes, keepdims=True) * np.float32(1.0 / levels)
  else:  # a traced bit width (the gradual baseline)
    levels = jnp.maximum(2.0 ** (jnp.asarray(bits, jnp.float32) - 1.0) - 1.0, 1.0)
    scale = jnp.max(ax, axis=axes, keepdims=True) * (1.0 / levels)
  scale = jnp.where(scale > 0, scale, 1.0)
  # full-size divisor: XLA rewrites ``x / broadcast(s)`` as ``x * broadcast(1 / s)``
  scale = lax.optimization_barrier(jnp.broadcast_to(scale, x.shape))
  uniform = jnp.clip(jnp.round(x / scale), -levels, levels) * scale
  if isinstance(bits, int):
    return uniform.astype(w.dtype)
  return jnp.where(jnp.asarray(bits) <= 1, binary, uniform).astype(w.dtype)


def _quantizer(bits, per_channel, where, exclude, name, in_axes=None,
               include_non_kernels=False) -> Transform:
  def bits_at(count):
    if callable(bits):
      return jnp.round(jnp.asarray(bits(count), jnp.float32)).astype(jnp.int32)
    return bits

  def init(path, w, axes):
    return None, None

  def compress(w, axes, trainable, aux, count, exact):
    c = quantize_values(lax.stop_gradient(w), bits_at(count), per_channel, axes)
    # Straight-through as c + (w - sg(w)): the forward value is exactly c. The form
    # w + sg(c - w) rounds c - w when |w| is far from |c| (binarize: an outlier weight next
    # to the mean), so the training view at beta = 0 was not the exported one.
    return c if exact else c + (w - lax.stop_gradient(w))

  def describe(w, axes, trainable, count):
    return LeafSpec(name, bits=int(bits_at(count)), per_channel=per_channel)

  return leafwise(LeafRule(init, compress, None, describe, needs_axes=per_channel),
                  where=where, exclude=exclude, name=name, in_axes=in_axes,
                  include_non_kernels=include_non_kernels)


def quantize(bits: int | Callable = 8, *, per_channel: bool = True, where: str | None = None,
             exclude: str | None = None, in_axes: _paths.InAxes = None,
             include_non_kernels: bool = False) -> Transform:
  r"""k-bit symmetric uniform quantisation with per-output-unit scales (straight-through).

  .. math:: C(W) = s \cdot \mathrm{clip}(\mathrm{round}(W / s), -L, L),\;
            L = 2^{k-1} - 1,\; s = \max|W_{:,j}| / L

  Args:
    bits: bit width ``k`` from 1 to 16 (``1`` is sign times mean magnitude; 16 is the
      widest integer code export stores, wider gains nothing over float weights), or a
      schedule ``count -> bits`` for the gradual bit-width baseline (rounded to an
      integer; checked at a few counts when ``quantize`` is called).
    per_channel: one scale per output unit of the kernel's linear map (for an
      ``(in, heads, head_dim)`` attention kernel: one per ``(head, head_dim)`` pair)
      rather than one per tensor.
    where, exclude: regexes narrowing the default selection (every ``kernel`` with
      ``ndim >= 2`` outside lookup tables).
    in_axes: ``{path regex: n or (axis, ...)}``: input axes of multi-axis kernels whose
      layout Flax's names do not tell (needed with ``per_channel`` only).
    include_non_kernels: also select biases, norm scales and tables.

  >>> import vcon_jax as vj
  >>> t = vj.quantize(bits=4)
  """
  if callable(bits):
    _schedules.check_schedule(bits, "bits", lambda v: 1 <= round(v) <= MAX_BITS,
                              f"in [1, {MAX_BITS}] once rounded")
  else:
    bits = _schedules.as_int("bits", bits, 1, MAX_BITS)
  if not isinstance(per_channel, bool):
    raise ValueError(f"per_channel must be True or False, got {per_channel!r}.")
  return _quantizer(bits, per_channel, where, exclude, "quantize", in_axes,
                    include_non_kernels)


def binarize(*, where: str | None = None, exclude: str | None = None,
             include_non_kernels: bool = False) -> Transform:
  r"""Binary weights as in the paper: ``sign(W) * mean|W|`` per layer (straight-through).

  .. math:: C(W) = \mathrm{sign}(W)\,\frac{1}{|W|}\sum |W_{ij}|

  >>> import vcon_jax as vj
  >>> t = vj.binarize()
  """
  return _quantizer(1, False, where, exclude, "binarize",
                    include_non_kernels=include_non_kernels)
