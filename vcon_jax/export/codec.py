"""Bit packing and the decoding of stored leaf encodings; numpy only.

This module imports nothing but numpy, so it is tested (and can be reused to read an
export) without JAX or Flax. Decoders take the array module ``xp`` (``numpy`` or
``jax.numpy``) as an argument and work on the ``(fan_in, fan_out)`` matrix view of a leaf;
callers reshape. Stored sparse layouts are decoded with numpy only (their positions are
found on the host); :func:`runtime_coded` turns them into the ``positions`` layout that
``jax.numpy`` decodes inside a jitted call.

A ``coded`` leaf's format (a dict in the manifest) has a ``layout`` (``dense``,
``bitmask``, ``indices``, ``nm`` or, at run time only, ``positions``), a ``codec``
(``float``, ``binary`` or ``int`` with ``bits``), ``count`` (how many values are stored)
and, for binary and int codecs, ``scale``: ``layer`` (a 0-d array), ``channel`` (one per
output unit, ``(fan_out,)``) or ``group`` (with ``group_size`` g: one per g consecutive
inputs of each output unit, ``(fan_in // g, fan_out)``; format version 3). An int codec
with ``zero_point`` stores unsigned codes and a ``zero`` array shaped like ``scale``
(value ``(code - zero) * scale``); without it the value is ``(code - L) * scale``,
``L = 2**(bits-1) - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SPARSE_LAYOUTS = ("bitmask", "indices", "nm")


def pack(codes, nbits: int) -> np.ndarray:
  """Packs non-negative integers below ``2**nbits`` into bytes, big-endian, no padding.

  >>> pack(np.array([1, 0, 3, 2]), 2)
  array([78], dtype=uint8)
  """
  codes = np.asarray(codes).reshape(-1)
  if nbits == 0:
    return np.zeros((0,), np.uint8)
  if nbits == 8:
    return codes.astype(np.uint8)
  shifts = np.arange(nbits - 1, -1, -1, dtype=np.uint32)
  bits = ((codes.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
  return np.packbits(bits.reshape(-1))


def unpack(xp, packed, count: int, nbits: int):
  """Inverse of :func:`pack` with ``numpy`` or ``jax.numpy``; returns ``int32`` codes.

  >>> unpack(np, pack(np.array([1, 0, 3, 2]), 2), 4, 2)
  array([1, 0, 3, 2], dtype=int32)
  """
  if nbits == 0 or count == 0:
    return xp.zeros((count,), xp.int32)
  if nbits == 8:
    return packed[:count].astype(xp.int32)
  if 8 % nbits == 0:
    per = 8 // nbits
    shifts = xp.asarray(8 - nbits * (1 + np.arange(per)), dtype=xp.uint8)
    vals = (packed[:, None] >> shifts[None, :]) & xp.uint8((1 << nbits) - 1)
    return vals.reshape(-1)[:count].astype(xp.int32)
  bits = xp.unpackbits(packed, count=count * nbits).reshape(count, nbits).astype(xp.int32)
  weights = xp.asarray(1 << np.arange(nbits - 1, -1, -1), dtype=xp.int32)
  return (bits * weights[None, :]).sum(axis=1).astype(xp.int32)


def index_dtype(size: int) -> np.dtype:
  """Smallest unsigned dtype holding indices ``0 .. size - 1``."""
  if size <= 1 << 8:
    return np.dtype(np.uint8)
  if size <= 1 << 16:
    return np.dtype(np.uint16)
  return np.dtype(np.int32)


def count_dtype(size: int) -> np.dtype:
  """Smallest unsigned dtype holding counts ``0 .. size``."""
  return index_dtype(size + 1)


def zero_dtype(bits: int) -> np.dtype:
  """Dtype of the zero points of ``bits``-bit asymmetric codes."""
  return np.dtype(np.uint8 if bits <= 8 else np.uint16)


def nm_bits(m: int) -> int:
  """Bits of one position inside a group of ``m`` (``ceil(log2 m)``)."""
  return max(int(m - 1).bit_length(), 0)


def nbytes(arrays: Mapping) -> int:
  """Total bytes of a dict of arrays."""
  return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def sparse_positions(fmt: Mapping, arr: Mapping, fan_in: int, fan_out: int) -> np.ndarray:
  """Flat positions in the ``(fan_in, fan_out)`` row-major matrix of the stored values (in
  their stored, unit-major order) of a sparse layout; numpy, on the host.

  Linear in the stored bytes: the bitmask is unpacked once and its set bits found with
  ``np.nonzero``; indices and n:m positions are offset by their unit and group.
  """
  nv, layout = fmt["count"], fmt["layout"]
  if layout == "bitmask":
    bits = np.unpackbits(np.asarray(arr["mask"]), count=fan_in * fan_out)
    unit, index = np.nonzero(bits.reshape(fan_out, fan_in))
  elif layout == "indices":
    unit = np.repeat(np.arange(fan_out), np.asarray(arr["counts"]).astype(np.int64))
    index = np.asarray(arr["indices"]).astype(np.int64)
  elif layout == "nm":
    n, m = fmt["n"], fmt["m"]
    groups = fan_in // m
    local = unpack(np, np.asarray(arr["nm_index"]), nv, nm_bits(m)).reshape(
        fan_out, groups, n)
    index = (np.arange(groups)[None, :, None] * m + local).reshape(-1)
    unit = np.repeat(np.arange(fan_out), groups * n)
  else:
    raise ValueError(f"unknown layout {layout!r} in the export manifest.")
  if unit.size != nv:
    raise ValueError(f"corrupt export: a {layout} leaf holds {unit.size} positions for "
                     f"{nv} values.")
  return index.astype(np.int64) * fan_out + unit


def runtime_coded(fmt: Mapping, arr: Mapping, fan_in: int, fan_out: int
                  ) -> tuple[dict, dict]:
  """The form of a ``coded`` leaf that a jitted call decodes with ``jax.numpy``.

  Dense layouts stay as stored. Sparse layouts (bitmask, indices, n:m) become the
  ``positions`` layout: ``int32`` flat positions in the matrix, sorted, and the values (or
  their bit-packed codes) permuted to match, so decoding is one in-order scatter. 4 bytes
  per kept value on top of the stored values, found once on the host.
  """
  if fmt["kind"] != "coded" or fmt["layout"] not in SPARSE_LAYOUTS:
    return dict(fmt), dict(arr)
  if fan_in * fan_out >= 2 ** 31:
    raise ValueError(f"a sparse leaf of {fan_in} x {fan_out} entries is too large for "
                     f"int32 positions; run it with decode='once'.")
  positions = sparse_positions(fmt, arr, fan_in, fan_out)
  order = np.argsort(positions, kind="stable")
  out = {"positions": positions[order].astype(np.int32)}
  nv = fmt["count"]
  if fmt["codec"] == "float":
    out["values"] = np.asarray(arr["values"])[order]
  else:
    bits = fmt["bits"]
    out["codes"] = pack(unpack(np, np.asarray(arr["codes"]), nv, bits)[order], bits)
    out["scale"] = arr["scale"]
    if "zero" in arr:
      out["zero"] = arr["zero"]
  new = {k: v for k, v in fmt.items() if k not in ("n", "m")}
  new.update(layout="positions", sorted=True)
  return new, out


def native_coded(fmt: Mapping, arr: Mapping, fan_in: int, fan_out: int
                 ) -> tuple[dict, dict]:
  """The device form of a ``coded`` leaf for ``decode="native"``.

  The stored arrays (sparse layouts too: :func:`decode_coded` decodes a bitmask or n:m
  layout with ``jax.numpy`` without forming positions, and an indices layout forms them
  inside the call), except that codes whose width does not divide a byte (3, 5, 6, 7 bits)
  are widened to the next that does (4 or 8), so a jitted call unpacks them with shifts
  and a mask instead of bit by bit: int3 is held as 4-bit nibbles (0.5 bytes a weight, the
  file 0.375), int5-7 as one byte a weight. 1, 2, 4, 8 and 9-16-bit codes are held as
  stored.
  """
  fmt, arr = dict(fmt), dict(arr)
  if (fmt["kind"] == "coded" and fmt["layout"] == "indices"
      and fan_in * fan_out >= 2 ** 31):
    raise ValueError(f"a sparse leaf of {fan_in} x {fan_out} entries is too large for "
                     f"int32 positions; run it with decode='once'.")
  if fmt["kind"] != "coded" or fmt["codec"] != "int" or fmt["bits"] not in (3, 5, 6, 7):
    return fmt, arr  # 1, 2, 4, 8 unpack by shifts; 9-16 bits are held as stored
  bits, held = fmt["bits"], 4 if fmt["bits"] < 4 else 8
  # the codes keep their values (level L and zero points follow `bits`); only the packing
  # width (`held_bits`) changes
  arr = dict(arr, codes=pack(unpack(np, np.asarray(arr["codes"]), fmt["count"], bits), held))
  return dict(fmt, held_bits=held), arr


def _values(xp, fmt: Mapping, arr: Mapping):
  """The stored values (floats, or integer levels before their scales)."""
  nv, codec = fmt["count"], fmt["codec"]
  if codec == "float":
    return arr["values"]
  if codec == "binary":
    return 1 - 2 * unpack(xp, arr["codes"], nv, 1)
  bits = fmt["bits"]
  codes = unpack(xp, arr["codes"], nv, fmt.get("held_bits", bits))
  return codes if fmt.get("zero_point") else codes - (2 ** (bits - 1) - 1)


def _dense_per_entry(xp, fmt: Mapping, a, fan_in: int):
  """A per-scale array (``scale`` or ``zero``) broadcastable to the ``(fan_in, fan_out)``
  matrix."""
  mode = fmt["scale"]
  if mode == "layer":
    return a
  if mode == "channel":
    return a[None, :]
  if mode == "group":
    return xp.repeat(a, fan_in // a.shape[0], axis=0)
  raise ValueError(f"unknown scale mode {mode!r} in the export manifest.")


def _sparse_per_value(fmt: Mapping, a, positions, fan_out: int):
  """A per-scale array gathered for values at flat ``positions`` of the matrix."""
  mode = fmt["scale"]
  if mode == "layer":
    return a
  if mode == "channel":
    return a[positions % fan_out]
  if mode == "group":
    return a[(positions // fan_out) // fmt["group_size"], positions % fan_out]
  raise ValueError(f"unknown scale mode {mode!r} in the export manifest.")


def decode_coded(xp, fmt: Mapping, arr: Mapping, fan_in: int, fan_out: int, dtype):
  """The ``(fan_in, fan_out)`` matrix of a ``coded`` leaf, in ``dtype``.

  >>> fmt = {"kind": "coded", "layout": "dense", "codec": "binary", "bits": 1,
  ...        "scale": "layer", "count": 4}
  >>> arr = {"codes": pack(np.array([0, 1, 1, 0]), 1), "scale": np.float32(0.5)}
  >>> decode_coded(np, fmt, arr, 2, 2, np.float32)
  array([[ 0.5, -0.5],
         [-0.5,  0.5]], dtype=float32)
  """
  codec, layout = fmt["codec"], fmt["layout"]
  if layout in ("bitmask", "nm") and xp is not np:
    return _decode_masked(xp, fmt, arr, fan_in, fan_out, dtype)
  if layout == "indices" and xp is not np:
    positions = _index_positions(xp, fmt, arr, fan_out)
  elif layout in SPARSE_LAYOUTS:
    if xp is not np:
      raise ValueError(f"internal: a stored {layout} leaf is decoded with numpy, or after "
                       f"runtime_coded with jax.numpy.")
    positions = sparse_positions(fmt, arr, fan_in, fan_out)
  elif layout == "positions":
    positions = arr["positions"]
  elif layout != "dense":
    raise ValueError(f"unknown layout {layout!r} in the export manifest.")
  vals = _values(xp, fmt, arr)
  if layout == "dense":
    mat = vals.reshape(fan_in, fan_out)
    if codec != "float":
      if fmt.get("zero_point"):
        mat = mat - _dense_per_entry(xp, fmt, arr["zero"].astype(xp.int32), fan_in)
      scale = arr["scale"].astype(xp.float32)  # stored in float32, float16 or bfloat16
      mat = mat.astype(xp.float32) * _dense_per_entry(xp, fmt, scale, fan_in)
    return mat.astype(dtype)
  if codec != "float":  # scaled per value: the same products as the dense layout's
    if fmt.get("zero_point"):
      vals = vals - _sparse_per_value(fmt, arr["zero"].astype(xp.int32), positions, fan_out)
    vals = vals.astype(xp.float32) * _sparse_per_value(fmt, arr["scale"].astype(xp.float32),
                                                       positions, fan_out)
  vals = vals.astype(dtype)
  if xp is np:
    flat = np.zeros((fan_in * fan_out,), vals.dtype)
    flat[positions] = vals
  else:
    flat = xp.zeros((fan_in * fan_out,), vals.dtype).at[positions].set(
        vals, unique_indices=True, indices_are_sorted=bool(fmt.get("sorted")),
        mode="promise_in_bounds")
  return flat.reshape(fan_in, fan_out)


def _index_positions(xp, fmt: Mapping, arr: Mapping, fan_out: int):
  """Flat matrix positions of an ``indices`` layout, computed with ``jax.numpy`` (inside a
  call: ``decode="native"`` holds only the counts and the narrow indices)."""
  unit = xp.repeat(xp.arange(fan_out, dtype=xp.int32), arr["counts"].astype(xp.int32),
                   total_repeat_length=fmt["count"])
  return arr["indices"].astype(xp.int32) * fan_out + unit


def _decode_masked(xp, fmt: Mapping, arr: Mapping, fan_in: int, fan_out: int, dtype):
  """The ``(fan_in, fan_out)`` matrix of a stored ``bitmask`` or ``nm`` leaf decoded with
  ``jax.numpy`` from the stored arrays alone (no positions are formed).

  bitmask: the kept values are in unit-major order, so the value at a set bit is the one
  ranked by the bits before it (a cumulative sum of per-byte bit counts, then the count
  within the byte). n:m: each of the ``m`` slots of a group
  takes the kept value whose stored position is that slot. Each kept value gets the same
  products as :func:`decode_coded`'s (level, zero point, scale, then the cast), every other
  entry ``+0``: the same matrix, bit for bit.
  """
  nv, layout = fmt["count"], fmt["layout"]
  vals = _values(xp, fmt, arr)
  # The stored order is unit-major, the matrix (fan_in, fan_out): the transpose is taken
  # on the integer index arrays, so the kernel is built in its own layout (a transpose
  # right before the matmul would be folded into it by XLA, which then sums in another
  # order: not the same logits as the dense kernel's).
  if layout == "bitmask":
    # the rank of each set bit: the set bits of the bytes before it (a cumulative sum over
    # bytes, 8x shorter than over bits: a long cumsum is slow on XLA:CPU) plus those above
    # it in its own byte (the mask is big-endian)
    mask = arr["mask"].astype(xp.int32)
    before = xp.cumsum(xp.bitwise_count(mask), dtype=xp.int32) - xp.bitwise_count(mask)
    shifts = xp.asarray(8 - np.arange(8), dtype=xp.int32)
    index = (before[:, None] + xp.bitwise_count(mask[:, None] >> shifts[None, :]))
    index = index.reshape(-1)[:fan_in * fan_out]
    kept = xp.unpackbits(arr["mask"], count=fan_in * fan_out).astype(bool)
    kept, index = kept.reshape(fan_out, fan_in).T, index.reshape(fan_out, fan_in).T
  else:
    n, m = fmt["n"], fmt["m"]
    groups = fan_in // m
    local = unpack(xp, arr["nm_index"], nv, nm_bits(m)).reshape(fan_out, groups, n, 1)
    hit = local == xp.arange(m, dtype=xp.int32)  # (fan_out, groups, n, m)
    kept = xp.any(hit, axis=2)
    which = xp.sum(xp.where(hit, xp.arange(n, dtype=xp.int32)[:, None], 0), axis=2)
    base = (xp.arange(fan_out * groups, dtype=xp.int32) * n).reshape(fan_out, groups, 1)
    kept = kept.reshape(fan_out, fan_in).T
    index = (base + which).reshape(fan_out, fan_in).T
  full = (vals[xp.clip(index, 0, nv - 1)] if nv
          else xp.zeros((fan_in, fan_out), vals.dtype))
  if fmt["codec"] != "float":
    if fmt.get("zero_point"):
      full = full - _dense_per_entry(xp, fmt, arr["zero"].astype(xp.int32), fan_in)
    full = full.astype(xp.float32) * _dense_per_entry(xp, fmt, arr["scale"].astype(xp.float32),
                                                      fan_in)
  return xp.where(kept, full.astype(dtype), xp.zeros((), dtype))


def decode_leaf(xp, fmt: Mapping, arr: Mapping, shape, dtype, matrix_shape):
  """The value of one stored leaf of ``shape`` and ``dtype``.

  Args:
    xp: ``numpy`` or ``jax.numpy``.
    fmt: the leaf's format from the manifest (``kind`` raw, low_rank or coded).
    arr: its arrays by role.
    shape, dtype: of the leaf.
    matrix_shape: ``(fan_in, fan_out)``, the leaf's matrix view (the caller's convention).
  """
  kind = fmt["kind"]
  if kind == "raw":
    return arr["value"]
  if kind == "low_rank":
    return (arr["a"] @ arr["b"]).astype(dtype).reshape(tuple(shape))
  if kind == "coded":
    return decode_coded(xp, fmt, arr, *matrix_shape, dtype).reshape(tuple(shape))
  raise ValueError(f"unknown leaf encoding {kind!r} in the export manifest.")
