"""Weight quantisation: binary (the paper's) and k-bit symmetric uniform."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from vcon_jax._spec import LeafSpec
from vcon_jax._transform import LeafRule, Transform, leafwise


def quantize_values(w: jax.Array, bits: Any, per_channel: bool = True) -> jax.Array:
  r"""Symmetric uniform quantisation of ``w`` to ``bits`` bits (values, not integers).

  ``bits == 1`` gives ``sign(w) * mean|w|`` (zero counts as positive, so exactly two
  values); ``bits >= 2`` gives ``scale * clip(round(w / scale), -L, L)`` with
  ``L = 2**(bits-1) - 1`` and ``scale = max|w| / L``. Scales are per output channel (last
  axis) when ``per_channel`` else per tensor. ``bits`` may be a traced integer.
  """
  x = w.astype(jnp.float32)
  axes = tuple(range(w.ndim - 1)) if per_channel and w.ndim > 1 else None
  ax = jnp.abs(x)
  mean = jnp.mean(ax, axis=axes, keepdims=True)
  binary = jnp.where(x >= 0, mean, -mean)
  if isinstance(bits, int) and bits == 1:
    return binary.astype(w.dtype)
  levels = jnp.maximum(2.0 ** (jnp.asarray(bits, jnp.float32) - 1.0) - 1.0, 1.0)
  scale = jnp.max(ax, axis=axes, keepdims=True) / levels
  scale = jnp.where(scale > 0, scale, 1.0)
  uniform = jnp.clip(jnp.round(x / scale), -levels, levels) * scale
  if isinstance(bits, int):
    return uniform.astype(w.dtype)
  return jnp.where(jnp.asarray(bits) <= 1, binary, uniform).astype(w.dtype)


def _quantizer(bits, per_channel, where, exclude, name) -> Transform:
  def bits_at(count):
    if callable(bits):
      return jnp.round(jnp.asarray(bits(count), jnp.float32)).astype(jnp.int32)
    return bits

  def init(path, w):
    return None, None

  def compress(w, trainable, aux, count, exact):
    c = quantize_values(lax.stop_gradient(w), bits_at(count), per_channel)
    # Straight-through as c + (w - sg(w)): the forward value is exactly c. The form
    # w + sg(c - w) rounds c - w when |w| is far from |c| (binarize: an outlier weight next
    # to the mean), so the training view at beta = 0 was not the exported one.
    return c if exact else c + (w - lax.stop_gradient(w))

  def describe(w, trainable, count):
    return LeafSpec(name, bits=int(bits_at(count)), per_channel=per_channel)

  return leafwise(LeafRule(init, compress, None, describe), where=where, exclude=exclude,
                  name=name)


def quantize(bits: int | Callable = 8, *, per_channel: bool = True, where: str | None = None,
             exclude: str | None = None) -> Transform:
  r"""k-bit symmetric uniform quantisation with per-output-channel scales (straight-through).

  .. math:: C(W) = s \cdot \mathrm{clip}(\mathrm{round}(W / s), -L, L),\;
            L = 2^{k-1} - 1,\; s = \max|W_{:,j}| / L

  Args:
    bits: bit width ``k >= 1`` (``1`` is sign times mean magnitude), or a schedule
      ``count -> bits`` for the gradual bit-width baseline (rounded to an integer).
    per_channel: one scale per output channel (last axis) rather than per tensor.
    where, exclude: leaf selection regexes (default: kernels with ``ndim >= 2``).

  >>> import vcon_jax as vj
  >>> t = vj.quantize(bits=4)
  """
  if not callable(bits) and (isinstance(bits, bool) or not isinstance(bits, int) or bits < 1):
    raise ValueError(f"bits must be an integer >= 1 or a schedule, got {bits!r}.")
  return _quantizer(bits, per_channel, where, exclude, "quantize")


def binarize(*, where: str | None = None, exclude: str | None = None) -> Transform:
  r"""Binary weights as in the paper: ``sign(W) * mean|W|`` per layer (straight-through).

  .. math:: C(W) = \mathrm{sign}(W)\,\frac{1}{|W|}\sum |W_{ij}|

  >>> import vcon_jax as vj
  >>> t = vj.binarize()
  """
  return _quantizer(1, False, where, exclude, "binarize")
