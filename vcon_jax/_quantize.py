"""Weight quantisation: binary (the paper's) and k-bit symmetric uniform."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vcon_jax import _paths, _validate
from vcon_jax._spec import LeafSpec
from vcon_jax._selection import Selection
from vcon_jax._transform import LeafRule, Transform, leafwise, rounded

#: Dtypes scales may be rounded to (``quantize(scale_dtype=...)``); None is float32.
SCALE_DTYPES = ("float32", "bfloat16", "float16")


#: Widest bit width: codes fit int16 (export's limit); wider gains nothing over floats.
MAX_BITS = 16


def quantize_values(w: jax.Array, bits: Any, per_channel: bool = True,
                    in_axes: tuple[int, ...] | None = None, *,
                    group_size: int | None = None, symmetric: bool = True,
                    scale_dtype: Any = None) -> jax.Array:
  r"""Uniform quantisation of ``w`` to ``bits`` bits (values, not integers).

  Symmetric (default): ``bits == 1`` gives ``sign(w) * mean|w|`` (zero counts as
  positive, so exactly two values); ``bits >= 2`` gives
  ``scale * clip(round(w / scale), -L, L)`` with ``L = 2**(bits-1) - 1`` and
  ``scale = max|w| * (1 / L)`` (the float32 reciprocal).

  Asymmetric (``symmetric=False``, ``bits >= 2``): ``2**bits`` levels over
  ``[lo, hi] = [min(min w, 0), max(max w, 0)]`` (zero stays exact):
  ``scale = (hi - lo) * (1 / (2**bits - 1))``, ``zero = clip(round(-lo / scale), 0, T)``,
  ``(clip(round(w / scale) + zero, 0, T) - zero) * scale`` with ``T = 2**bits - 1``.

  The statistics are taken per output unit when ``per_channel`` (over ``in_axes``, the
  input axes; ``None``: every axis but the last), else per tensor; with ``group_size=g``
  per group of ``g`` consecutive inputs of each output unit (inputs in the order of the
  kernel's ``(fan_in, fan_out)`` matrix view; ``g`` must divide the fan-in). ``bits``
  may be a traced integer. ``scale_dtype`` (``jnp.bfloat16`` or ``jnp.float16``) rounds
  every scale to that dtype (what the scales are stored in); ``None``: float32.
  """
  if group_size is not None:
    mat = _paths.to_matrix(w, in_axes)
    fan_in, fan_out = mat.shape
    if fan_in % group_size:
      raise ValueError(f"group_size={group_size} does not divide the fan-in {fan_in} of a "
                       f"{tuple(w.shape)} weight; pass a group_size that divides it.")
    grouped = mat.reshape(fan_in // group_size, group_size, fan_out)
    out = _uniform(grouped, bits, (1,), symmetric, scale_dtype)
    return _paths.from_matrix(out.reshape(fan_in, fan_out), w.shape, in_axes)
  if per_channel and w.ndim > 1:
    axes = tuple(range(w.ndim - 1)) if in_axes is None else tuple(in_axes)
  else:
    axes = None
  return _uniform(w, bits, axes, symmetric, scale_dtype)


def _positive(scale, scale_dtype):
  """``scale`` rounded to ``scale_dtype`` (fenced, so XLA keeps the rounding), 1 where it
  is not positive (an all-zero unit)."""
  if scale_dtype is not None:
    scale = rounded(scale, scale_dtype).astype(jnp.float32)
  return jnp.where(scale > 0, scale, 1.0)


def _uniform(w: jax.Array, bits: Any, axes: tuple[int, ...] | None,
             symmetric: bool, scale_dtype: Any = None) -> jax.Array:
  """:func:`quantize_values` with the statistics taken over ``axes`` (``None``: all)."""
  x = w.astype(jnp.float32)
  ax = jnp.abs(x)
  # The same arithmetic in every context. XLA rewrites ``x / constant`` as
  # ``x * (1 / constant)`` under jit only, and its CPU division is not always correctly
  # rounded: a scale 1 ulp apart moved weights on a rounding tie (``W / s = 3.5``) to
  # another level in a jitted step than in an eager view. So constants are divided on
  # the host (a multiplication by a float32 reciprocal, exact and the same everywhere),
  # and every division by a per-unit statistic has full-size operands behind a barrier.
  count = ax.size if axes is None else math.prod(ax.shape[a] for a in axes)
  traced = not isinstance(bits, int)
  if not symmetric:
    return _asymmetric(x, bits, axes, traced, scale_dtype).astype(w.dtype)
  mean = jnp.sum(ax, axis=axes, keepdims=True) * np.float32(1.0 / count)
  binary = jnp.where(x >= 0, mean, -mean)
  if not traced and bits == 1:
    return binary.astype(w.dtype)
  if not traced:
    levels = float(max(2 ** (bits - 1) - 1, 1))
    scale = jnp.max(ax, axis=axes, keepdims=True) * np.float32(1.0 / levels)
  else:  # a traced bit width (the gradual baseline)
    levels = jnp.maximum(2.0 ** (jnp.asarray(bits, jnp.float32) - 1.0) - 1.0, 1.0)
    scale = jnp.max(ax, axis=axes, keepdims=True) * (1.0 / levels)
  scale = _positive(scale, scale_dtype)
  # full-size divisor: XLA rewrites ``x / broadcast(s)`` as ``x * broadcast(1 / s)``
  scale = lax.optimization_barrier(jnp.broadcast_to(scale, x.shape))
  uniform = jnp.clip(jnp.round(x / scale), -levels, levels) * scale
  if not traced:
    return uniform.astype(w.dtype)
  return jnp.where(jnp.asarray(bits) <= 1, binary, uniform).astype(w.dtype)


def _asymmetric(x: jax.Array, bits: Any, axes, traced: bool, scale_dtype) -> jax.Array:
  if traced:
    top = jnp.maximum(2.0 ** jnp.asarray(bits, jnp.float32) - 1.0, 1.0)
    inv = 1.0 / top
  else:
    top = float(2 ** bits - 1)
    inv = np.float32(1.0 / top)
  lo = jnp.minimum(jnp.min(x, axis=axes, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(x, axis=axes, keepdims=True), 0.0)
  scale = _positive((hi - lo) * inv, scale_dtype)
  scale, lo = lax.optimization_barrier((jnp.broadcast_to(scale, x.shape),
                                        jnp.broadcast_to(lo, x.shape)))
  zero = jnp.clip(jnp.round(-lo / scale), 0.0, top)
  q = jnp.clip(jnp.round(x / scale) + zero, 0.0, top)
  return (q - zero) * scale


def _quantizer(bits, per_channel, name, selection, group_size=None, symmetric=True,
               scale_dtype=None, **old) -> Transform:
  def bits_at(count):
    if callable(bits):
      return jnp.round(jnp.asarray(bits(count), jnp.float32)).astype(jnp.int32)
    return bits

  def init(path, w, *, axes):
    if group_size is not None:
      fan_in = _paths.matricize_shape(tuple(w.shape), axes)[0]
      if fan_in % group_size:
        raise ValueError(f"{name}(group_size={group_size}): the fan-in {fan_in} of {path!r} "
                         f"(shape {tuple(w.shape)}) is not a multiple of {group_size}; pass a "
                         f"group_size that divides it, or exclude={path!r}.")
    return None, None

  def compress(w, *, axes, trainable, aux, count):
    return quantize_values(w, bits_at(count), per_channel, axes, group_size=group_size,
                           symmetric=symmetric, scale_dtype=scale_dtype)

  def describe(w, *, axes, trainable, count):
    return LeafSpec(name, bits=int(bits_at(count)), per_channel=per_channel,
                    group_size=group_size, symmetric=None if symmetric else False)

  needs_axes = per_channel or group_size is not None
  return leafwise(LeafRule(init, compress, None, describe, needs_axes=needs_axes),
                  name=name, selection=selection, **old)


def quantize(bits: int | Callable = 8, *, per_channel: bool = True,
             group_size: int | None = None, symmetric: bool = True,
             selection: Selection | None = None,
             where: str | None = None, exclude: str | None = None,
             in_axes: _paths.InAxes = None, include_non_kernels: bool = False,
             stacked: dict | None = None, scale_dtype: Any = None) -> Transform:
  r"""k-bit uniform quantisation with per-output-unit or per-group scales (straight-through).

  .. math:: C(W) = s \cdot \mathrm{clip}(\mathrm{round}(W / s), -L, L),\;
            L = 2^{k-1} - 1,\; s = \max|W_{:,j}| / L

  With ``group_size=g`` each group of ``g`` consecutive inputs of each output unit has its
  own ``s`` (the sub-channel / group-wise format low-bit language models use: int4 with
  ``g`` = 32 to 128). With ``symmetric=False`` the codes are asymmetric: ``2**k`` levels
  over ``[min(W, 0), max(W, 0)]`` of each group with an integer zero point (see
  :func:`quantize_values`); 2 bits then give 4 levels instead of 3.

  Args:
    bits: bit width ``k`` from 1 to 16 (``1`` is sign times mean magnitude; 16 is the
      widest integer code export stores, wider gains nothing over float weights), or a
      schedule ``count -> bits`` for the gradual bit-width baseline (rounded to an
      integer; checked at a few counts when ``quantize`` is called).
    per_channel: one scale per output unit of the kernel's linear map (for an
      ``(in, heads, head_dim)`` attention kernel: one per ``(head, head_dim)`` pair)
      rather than one per tensor.
    group_size: one scale per ``group_size`` consecutive inputs of each output unit
      (along the kernel's input axes, flattened in order); must divide every selected
      kernel's fan-in (refused at ``init`` otherwise). ``None``: per output unit.
    symmetric: ``False`` for asymmetric codes with a zero point (``bits >= 2``).
    scale_dtype: ``jnp.bfloat16`` or ``jnp.float16`` rounds every scale to that dtype
      during training, and the export then stores the scales in it (2 bytes each: int4
      with ``group_size=32`` takes 4.5 bits per weight instead of 5); ``None``: float32.
    selection: which leaves, and how each is read (:class:`vcon_jax.Selection`); default:
      the linear maps a trace finds (``make_train_step(example=)``), else Flax's
      ``kernel`` leaves by names, refusing what the names cannot settle.
    where, exclude, in_axes, include_non_kernels, stacked: deprecated (0.3); the fields of
      :class:`vcon_jax.Selection` of the same names.

  >>> import vcon_jax as vj
  >>> t = vj.quantize(bits=4)
  >>> t = vj.quantize(bits=4, group_size=32)  # int4, a scale per 32 inputs
  """
  bits = _validate.int_or_schedule("bits", bits, 1, MAX_BITS)
  _validate.as_bool("per_channel", per_channel)
  _validate.as_bool("symmetric", symmetric)
  if group_size is not None:
    group_size = _validate.as_int("group_size", group_size, 1, None)
    if not per_channel:
      raise ValueError("group_size gives a scale per group of inputs of each output unit; "
                       "it contradicts per_channel=False (one scale per tensor).")
  if scale_dtype is not None:
    name = jnp.dtype(scale_dtype).name if _is_dtype(scale_dtype) else None
    if name not in SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)} or None, got "
                       f"{scale_dtype!r}.")
    scale_dtype = None if name == "float32" else jnp.dtype(name)
  if not symmetric and (callable(bits) or bits < 2):
    raise ValueError(f"symmetric=False needs a fixed bits >= 2, got bits={bits!r}.")
  return _quantizer(bits, per_channel, "quantize", selection, group_size, symmetric,
                    scale_dtype, where=where, exclude=exclude, in_axes=in_axes,
                    include_non_kernels=include_non_kernels, stacked=stacked)


def _is_dtype(x: Any) -> bool:
  try:
    jnp.dtype(x)
    return True
  except TypeError:
    return False


def binarize(*, selection: Selection | None = None, where: str | None = None,
             exclude: str | None = None,
             in_axes: _paths.InAxes = None, include_non_kernels: bool = False,
             stacked: dict | None = None) -> Transform:
  r"""Binary weights as in the paper: ``sign(W) * mean|W|`` per layer (straight-through).

  .. math:: C(W) = \mathrm{sign}(W)\,\frac{1}{|W|}\sum |W_{ij}|

  Args:
    selection: which leaves, and how each is read (:class:`vcon_jax.Selection`); default:
      the linear maps a trace finds (``make_train_step(example=)``), else Flax's
      ``kernel`` leaves by names, refusing what the names cannot settle.
    where, exclude, in_axes, include_non_kernels, stacked: deprecated (0.3); the fields of
      :class:`vcon_jax.Selection` of the same names.

  >>> import vcon_jax as vj
  >>> t = vj.binarize()
  """
  return _quantizer(1, False, "binarize", selection, where=where, exclude=exclude,
                    in_axes=in_axes, include_non_kernels=include_non_kernels,
                    stacked=stacked)
