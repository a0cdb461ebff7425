"""Compact export of a compressed model, loading it back to run, and a size summary.

:func:`export` writes the compressed model (``beta = 0``: exactly the values of
``step.compressed_params(state)``) as one ``.npz`` file whose arrays are the compact
encodings and whose ``__manifest__`` entry is a JSON description of every leaf.

Every selected (compressed) leaf, viewed as a ``(fan_in, fan_out)`` matrix, gets the
smallest of these encodings that reproduces its values *exactly* (each candidate is decoded
and compared before it is chosen; a leaf nothing fits is stored as it is):

* **layout** of the stored values: ``dense`` (all entries, row-major); ``bitmask`` (one bit
  per entry, then the non-zeros of each output unit); ``indices`` (per output unit the count
  of non-zeros and their input indices as ``uint8``/``uint16``/``int32``, the smallest
  that holds ``fan_in``); ``n:m`` (per group of ``m`` inputs the ``n`` kept values and
  their ``ceil(log2 m)``-bit positions).
* **codec** of those values: ``float`` (as they are); ``binary`` (one sign bit per value and
  one scale per layer or per output unit); ``int<k>`` (``k``-bit codes packed into bytes,
  ``q * scale`` with one float32 scale per output unit or per layer).
* **low rank**: a leaf whose last transform is ``low_rank`` is stored as its two factors
  ``A`` (fan_in x r) and ``B`` (r x fan_out).

Unselected leaves and the model state (BatchNorm statistics, ...) are stored as they are.
The transform's own metadata (``Transform.describe``: bits, n:m pattern, last member of a
chain) chooses which encodings to try; the values themselves decide which one is exact.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vcon_jax import _paths

FORMAT = "vcon_jax.compact"
VERSION = 1
MANIFEST_KEY = "__manifest__"
_SHIFT_CANDIDATES = (0, 1, -1, 2, -2, 3, -3)
_MAX_INT_BITS = 16


# ------------------------------------------------------------------------ bit packing
def _pack(codes: np.ndarray, nbits: int) -> np.ndarray:
  """Packs non-negative integers below ``2**nbits`` into bytes, big-endian, no padding."""
  codes = np.asarray(codes).reshape(-1)
  if nbits == 0:
    return np.zeros((0,), np.uint8)
  if nbits == 8:
    return codes.astype(np.uint8)
  shifts = np.arange(nbits - 1, -1, -1, dtype=np.uint32)
  bits = ((codes.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
  return np.packbits(bits.reshape(-1))


def _unpack(xp, packed, count: int, nbits: int):
  """Inverse of :func:`_pack` with ``numpy`` or ``jax.numpy``; returns ``int32`` codes."""
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


def _index_dtype(size: int) -> np.dtype:
  """Smallest unsigned dtype holding indices ``0 .. size - 1``."""
  if size <= 1 << 8:
    return np.dtype(np.uint8)
  if size <= 1 << 16:
    return np.dtype(np.uint16)
  return np.dtype(np.int32)


def _count_dtype(size: int) -> np.dtype:
  """Smallest unsigned dtype holding counts ``0 .. size``."""
  return _index_dtype(size + 1)


# ----------------------------------------------------------------------- leaf decoding
_SPARSE_LAYOUTS = ("bitmask", "indices", "nm")


def _sparse_positions(fmt: dict, arr: Mapping, fan_in: int, fan_out: int) -> np.ndarray:
  """Flat positions in the ``(fan_in, fan_out)`` row-major kernel of the stored values (in
  their stored, unit-major order) of a sparse layout; numpy, on the host.

  Linear in the stored bytes: the bitmask is unpacked once and its set bits found with
  ``np.nonzero`` (no running count over every bit), indices and n:m positions are offset
  by their unit and group.
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
    local = _unpack(np, np.asarray(arr["nm_index"]), nv, _nm_bits(m)).reshape(
        fan_out, groups, n)
    index = (np.arange(groups)[None, :, None] * m + local).reshape(-1)
    unit = np.repeat(np.arange(fan_out), groups * n)
  else:
    raise ValueError(f"unknown layout {layout!r} in the export manifest.")
  if unit.size != nv:
    raise ValueError(f"corrupt export: a {layout} leaf holds {unit.size} positions for "
                     f"{nv} values.")
  return index.astype(np.int64) * fan_out + unit


def _runtime_coded(fmt: dict, arr: Mapping, shape) -> tuple[dict, dict]:
  """The form of a ``coded`` leaf that :meth:`CompressedModel.apply` decodes on the fly.

  Dense layouts stay as stored. Sparse layouts (bitmask, indices, n:m) become the
  ``positions`` layout: ``int32`` flat positions in the kernel, sorted, and the values (or
  their bit-packed codes) permuted to match, so decoding is one in-order scatter. 4 bytes
  per kept value on top of the stored values (a bitmask is 1 bit per weight), found once
  on the host.
  """
  if fmt["kind"] != "coded" or fmt["layout"] not in _SPARSE_LAYOUTS:
    return fmt, dict(arr)
  fan_in, fan_out = _paths.matricize_shape(tuple(shape))
  if fan_in * fan_out >= 2 ** 31:
    raise ValueError(f"a sparse leaf of shape {tuple(shape)} has too many entries for int32 "
                     f"positions; run it with decode='once'.")
  positions = _sparse_positions(fmt, arr, fan_in, fan_out)
  order = np.argsort(positions, kind="stable")
  out = {"positions": positions[order].astype(np.int32)}
  nv = fmt["count"]
  if fmt["codec"] == "float":
    out["values"] = np.asarray(arr["values"])[order]
  else:
    bits = fmt["bits"]
    out["codes"] = _pack(_unpack(np, np.asarray(arr["codes"]), nv, bits)[order], bits)
    out["scale"] = arr["scale"]
  new = {k: v for k, v in fmt.items() if k not in ("n", "m")}
  new.update(layout="positions", sorted=True)
  return new, out


def _decode_coded(xp, fmt: dict, arr: Mapping, shape, dtype):
  """Dense value of a ``coded`` leaf (layout + codec) with numpy or jax.numpy.

  Stored sparse layouts are decoded with numpy only (their positions are found on the
  host); ``jax.numpy`` decodes the dense layout and the ``positions`` layout of
  :func:`_runtime_coded`.
  """
  fan_in, fan_out = _paths.matricize_shape(tuple(shape))
  total = fan_in * fan_out
  nv, codec, layout = fmt["count"], fmt["codec"], fmt["layout"]
  if layout in _SPARSE_LAYOUTS:
    if xp is not np:
      raise ValueError(f"internal: a stored {layout} leaf is decoded with numpy, or after "
                       f"_runtime_coded with jax.numpy.")
    positions = _sparse_positions(fmt, arr, fan_in, fan_out)
  elif layout == "positions":
    positions = arr["positions"]
  elif layout != "dense":
    raise ValueError(f"unknown layout {layout!r} in the export manifest.")
  if codec == "float":
    vals = arr["values"]
  elif codec == "binary":
    vals = 1 - 2 * _unpack(xp, arr["codes"], nv, 1)
  else:
    bits = fmt["bits"]
    vals = _unpack(xp, arr["codes"], nv, bits) - (2 ** (bits - 1) - 1)

  if layout == "dense":
    mat = vals.reshape(fan_in, fan_out)
    if codec != "float":
      scale = arr["scale"]
      mat = mat.astype(xp.float32) * (scale if scale.ndim == 0 else scale[None, :])
    return mat.astype(dtype).reshape(tuple(shape))
  if codec != "float":  # scaled per value: the same products as the dense layout's
    scale = arr["scale"]
    vals = vals.astype(xp.float32) * (scale if scale.ndim == 0 else scale[positions % fan_out])
  vals = vals.astype(dtype)
  if xp is np:
    flat = np.zeros((total,), vals.dtype)
    flat[positions] = vals
  else:
    flat = jnp.zeros((total,), vals.dtype).at[positions].set(
        vals, unique_indices=True, indices_are_sorted=bool(fmt.get("sorted")),
        mode="promise_in_bounds")
  return flat.reshape(tuple(shape))


def _decode_leaf(xp, fmt: dict, arr: Mapping, shape, dtype):
  kind = fmt["kind"]
  if kind == "raw":
    return arr["value"]
  if kind == "low_rank":
    return (arr["a"] @ arr["b"]).astype(dtype).reshape(tuple(shape))
  if kind == "coded":
    return _decode_coded(xp, fmt, arr, shape, dtype)
  raise ValueError(f"unknown leaf encoding {kind!r} in the export manifest.")


def _nm_bits(m: int) -> int:
  return max(int(m - 1).bit_length(), 0)


# ----------------------------------------------------------------------- leaf encoding
def _same(decoded: np.ndarray, target: np.ndarray) -> bool:
  return decoded.shape == target.shape and bool(np.array_equal(decoded, target))


def _column_max(a: np.ndarray, col: np.ndarray, ncol: int) -> np.ndarray:
  out = np.zeros((ncol,), np.float32)
  if a.size:
    np.maximum.at(out, col, a)
  return out


def _fit_binary(v, col, ncol, dtype):
  """Sign bits and scales (``ncol`` of them) reproducing ``v`` exactly, or ``None``."""
  vf = v.astype(np.float32)
  scale = _column_max(np.abs(vf), col, ncol)
  sign = np.signbit(vf)
  decoded = ((1 - 2 * sign.astype(np.int32)).astype(np.float32) * scale[col]).astype(dtype)
  if not _same(decoded, v):
    return None
  return _pack(sign.astype(np.uint8), 1), scale


def _rounding_interval(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For non-negative floats ``a`` (any float dtype), the float64 interval rounding to each."""
  uint = np.dtype(f"u{a.dtype.itemsize}")
  bits = a.view(uint)
  prev = np.where(bits > 0, bits - 1, bits).astype(uint).view(a.dtype).astype(np.float64)
  nxt = (bits + 1).astype(uint).view(a.dtype).astype(np.float64)
  a64 = a.astype(np.float64)
  return (a64 + prev) / 2, (a64 + nxt) / 2


def _fit_int(v, col, ncol, bits, dtype):
  """``bits``-bit codes and scales reproducing ``v`` as ``q * scale`` exactly, or ``None``.

  Candidate scales per group: its largest magnitude over ``L`` (the quantiser's own
  ``max|w| / L`` up to rounding), and the middle of the interval of scales that round every
  ``q * scale`` to its stored value (needed for bfloat16 and other short dtypes); each
  nudged by up to three float32 ulps, and the first that reproduces the group is kept.
  """
  levels = 2 ** (bits - 1) - 1
  vf = v.astype(np.float32)
  base = _column_max(np.abs(vf), col, ncol) / np.float32(levels)
  base = np.where(base > 0, base, np.float32(1.0)).astype(np.float32)
  bases = [base]
  q0 = np.clip(np.rint(vf / base[col]), -levels, levels)
  nz = q0 != 0
  if nz.any():
    lo, hi = _rounding_interval(np.abs(v[nz]))
    qa = np.abs(q0[nz]).astype(np.float64)
    s_lo = np.full((ncol,), -np.inf)
    s_hi = np.full((ncol,), np.inf)
    np.maximum.at(s_lo, col[nz], lo / qa)
    np.minimum.at(s_hi, col[nz], hi / qa)
    mid = np.where(np.isfinite(s_lo) & np.isfinite(s_hi) & (s_lo <= s_hi),
                   (s_lo + s_hi) / 2, base)
    bases.append(mid.astype(np.float32))
  chosen = np.full((ncol,), np.nan, np.float32)
  for start in bases:
    for shift in _SHIFT_CANDIDATES:
      s = start
      direction = np.float32(np.inf if shift > 0 else -np.inf)
      for _ in range(abs(shift)):
        s = np.nextafter(s, direction).astype(np.float32)
      sc = s[col]
      q = np.clip(np.rint(vf / sc), -levels, levels)
      ok = (q.astype(np.float32) * sc).astype(dtype) == v
      bad = np.bincount(col[~ok], minlength=ncol) > 0 if not ok.all() else np.zeros(ncol, bool)
      fresh = ~bad & np.isnan(chosen)
      chosen[fresh] = s[fresh]
      if not np.isnan(chosen).any():
        break
    if not np.isnan(chosen).any():
      break
  if np.isnan(chosen).any():
    return None
  sc = chosen[col]
  q = np.clip(np.rint(vf / sc), -levels, levels)
  if not _same((q.astype(np.float32) * sc).astype(dtype), v):
    return None
  return _pack((q + levels).astype(np.uint32), bits), chosen


def _scale_array(scale: np.ndarray, per_layer: bool) -> np.ndarray:
  return np.asarray(scale[0] if per_layer else scale, np.float32)


def _codecs(v, col, fan_out, dtype, bits_options, layer_first):
  """Yields ``(fmt, arrays)`` for every codec that reproduces ``v`` exactly.

  Binary is always tried; of ``bits_options`` the smallest width that fits is yielded.
  Scales are tried per layer then per output unit (or the reverse: ``layer_first``).
  """
  yield {"codec": "float"}, {"values": v}
  if not jnp.issubdtype(dtype, jnp.floating) or v.dtype != dtype:
    return
  zero_col = np.zeros_like(col)
  modes = (True, False) if layer_first else (False, True)
  for per_layer in modes:  # binary: one sign bit per value
    fit = _fit_binary(v, zero_col if per_layer else col, 1 if per_layer else fan_out, dtype)
    if fit is not None:
      codes, scale = fit
      yield ({"codec": "binary", "bits": 1, "scale": "layer" if per_layer else "channel"},
             {"codes": codes, "scale": _scale_array(scale, per_layer)})
      break
  for bits in bits_options:
    for per_layer in modes:
      fit = _fit_int(v, zero_col if per_layer else col, 1 if per_layer else fan_out, bits,
                     dtype)
      if fit is not None:
        codes, scale = fit
        yield ({"codec": "int", "bits": bits, "scale": "layer" if per_layer else "channel"},
               {"codes": codes, "scale": _scale_array(scale, per_layer)})
        break
    else:
      continue
    break  # the smallest bit width that fits


def _layouts(mat: np.ndarray, pattern: tuple[int, int] | None):
  """Yields ``(fmt, arrays, values, value_columns)`` for each applicable layout."""
  fan_in, fan_out = mat.shape
  col = np.broadcast_to(np.arange(fan_out, dtype=np.int32), mat.shape).reshape(-1)
  yield {"layout": "dense"}, {}, mat.reshape(-1), col
  units = mat.T  # (fan_out, fan_in): one row per output unit
  if pattern is not None:
    n, m = pattern
    if 0 < m and fan_in % m == 0 and n < m:
      groups = units.reshape(fan_out, fan_in // m, m)
      if int((groups != 0).sum(axis=-1).max(initial=0)) <= n:
        # the non-zeros of each group first (stable), topped up with zeros, in index order
        order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :n]
        order = np.sort(order, axis=-1)
        vals = np.take_along_axis(groups, order, axis=-1).reshape(-1)
        vcol = np.repeat(np.arange(fan_out, dtype=np.int32), (fan_in // m) * n)
        yield ({"layout": "nm", "n": n, "m": m},
               {"nm_index": _pack(order.reshape(-1).astype(np.uint32), _nm_bits(m))},
               vals, vcol)
  nonzero = units != 0
  nnz = int(nonzero.sum())
  if nnz < mat.size:
    counts = nonzero.sum(axis=1)
    vals = units[nonzero]
    vcol = np.repeat(np.arange(fan_out, dtype=np.int32), counts)
    mask_bytes = (mat.size + 7) // 8
    index_bytes = (fan_out * _count_dtype(fan_in).itemsize
                   + nnz * _index_dtype(fan_in).itemsize)
    if mask_bytes <= index_bytes:
      yield ({"layout": "bitmask"}, {"mask": np.packbits(nonzero.reshape(-1))}, vals, vcol)
    else:
      indices = np.nonzero(nonzero)[1].astype(_index_dtype(fan_in))
      yield ({"layout": "indices"},
             {"counts": counts.astype(_count_dtype(fan_in)), "indices": indices}, vals, vcol)


def _nbytes(arrays: Mapping) -> int:
  return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def _parse_pattern(settings: Mapping) -> tuple[int, int] | None:
  pattern = settings.get("pattern")
  if isinstance(pattern, str) and ":" in pattern:
    try:
      n, m = (int(p) for p in pattern.split(":"))
      return n, m
    except ValueError:
      return None
  return None


def _bits_options(settings: Mapping, ops: list, values: np.ndarray, fan_out: int
                  ) -> list[int]:
  bits = settings.get("bits")
  if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
    return [int(bits)] if 2 <= bits <= _MAX_INT_BITS else []
  if ops:  # a known transform without bits: nothing quantised
    return []
  # No metadata (e.g. a custom transform): look for few distinct magnitudes.
  distinct = np.unique(np.abs(values)).size if values.size else 0
  if 0 < distinct <= min(values.size // 2, 128 * fan_out + 1):
    return list(range(2, 9))
  return []


def _encode_low_rank(c: np.ndarray, a: np.ndarray, b: np.ndarray, rank: int | None):
  if rank is not None and 0 < rank < a.shape[1]:
    a, b = a[:, :rank], b[:rank]
  fan_in, fan_out = _paths.matricize_shape(c.shape)
  if a.shape[0] != fan_in or b.shape[1] != fan_out:
    return None
  if not jnp.issubdtype(c.dtype, jnp.floating):
    return None
  # The factors are the truth; the check only rejects values that are not their product
  # (e.g. a chain member whose own schedule has not reached 0). The tolerance allows for
  # reduced-precision matmuls (TF32 on GPUs, bfloat16 params) computing ``c``.
  prod = a.astype(np.float64) @ b.astype(np.float64)
  bound = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
  tol = max(4e-3, 2 * float(jnp.finfo(c.dtype).eps))
  err = np.abs(prod - c.reshape(fan_in, fan_out).astype(np.float64))
  if not np.all(err <= tol * (bound.max(initial=0.0) + 1e-30)):
    return None
  return ({"kind": "low_rank", "rank": int(a.shape[1])},
          {"a": np.ascontiguousarray(a), "b": np.ascontiguousarray(b)})


def _encode_selected(c: np.ndarray, settings: Mapping, factors):
  """The smallest exact encoding of one compressed leaf: ``(fmt, arrays)``."""
  ops = [p for p in str(settings.get("transform", "")).split("+") if p]
  if factors is not None and ops and ops[-1] == "low_rank":
    rank = settings.get("rank")
    enc = _encode_low_rank(c, *factors, rank if isinstance(rank, int) else None)
    if enc is not None:
      return enc
  best = ({"kind": "raw"}, {"value": c})
  if c.ndim == 0 or c.size == 0:
    return best
  fan_in, fan_out = _paths.matricize_shape(c.shape)
  mat = c.reshape(fan_in, fan_out)
  best_bytes = c.nbytes
  bits_options = _bits_options(settings, ops, mat, fan_out)
  layer_first = not settings.get("per_channel", False)
  for layout, layout_arrays, vals, vcol in _layouts(mat, _parse_pattern(settings)):
    for codec, codec_arrays in _codecs(vals, vcol, fan_out, c.dtype, bits_options,
                                       layer_first):
      arrays = {**layout_arrays, **codec_arrays}
      size = _nbytes(arrays)
      if size < best_bytes:
        fmt = {"kind": "coded", **layout, **codec, "count": int(vals.size)}
        if _same(_decode_coded(np, fmt, arrays, c.shape, c.dtype), c):
          best, best_bytes = (fmt, arrays), size
  return best


def _format_name(fmt: Mapping, dtype) -> str:
  kind = fmt["kind"]
  if kind == "raw":
    return "raw"
  if kind == "low_rank":
    return f"low_rank(r={fmt['rank']})"
  layout = fmt["layout"] if fmt["layout"] != "nm" else f"{fmt['n']}:{fmt['m']}"
  codec = {"float": np.dtype(dtype).name, "binary": "binary"}.get(
      fmt["codec"], f"int{fmt.get('bits')}")
  if fmt["codec"] != "float":
    codec += "/layer" if fmt["scale"] == "layer" else "/channel"
  return f"{layout}+{codec}"


# ------------------------------------------------------------------- model-level export
def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x)
  if x is None or isinstance(x, str):
    return x
  try:
    return float(np.asarray(x))
  except (TypeError, ValueError):
    return str(x)


def _key_list(path: tuple) -> list:
  """Pytree path -> JSON-able keys (ints stay ints: NNX list indices)."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    out.append(k if isinstance(k, int) else str(k))
  return out


def _flatten(tree, with_path_str: bool = False) -> list[tuple]:
  """``(keys, leaf)`` pairs, or ``(keys, path, leaf)`` with the transform's path string."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if with_path_str:
    return [(_key_list(p), _paths.path_str(p), leaf) for p, leaf in flat]
  return [(_key_list(p), leaf) for p, leaf in flat]


def _unflatten(entries) -> dict:
  root: dict = {}
  for keys, value in entries:
    node = root
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return root


def _find_factors(trainable, path: str):
  """The last ``{'a', 'b'}`` factor pair stored for ``path`` in the transform state."""
  found = []

  def walk(node):
    if isinstance(node, Mapping):
      entry = node.get(path) if path in node else None
      if isinstance(entry, Mapping) and "a" in entry and "b" in entry:
        found.append((np.asarray(entry["a"]), np.asarray(entry["b"])))
      for k, v in node.items():
        if k != path:
          walk(v)
    elif isinstance(node, (tuple, list)):
      for v in node:
        walk(v)

  walk(trainable)
  return found[-1] if found else None


def _to_pure(tree):
  return tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree


def _check_step(step, state):
  needed = ("transform", "compressed_params", "adapter")
  if not all(hasattr(step, a) for a in needed):
    raise ValueError(f"export/summary need the TrainStep from vj.make_train_step, got "
                     f"{type(step).__name__}.")
  if not hasattr(state, "params") or not hasattr(state, "transform_state"):
    raise ValueError(f"export/summary need the TrainState from step.init / step(...), got "
                     f"{type(state).__name__}.")


def _encode_model(step, state) -> tuple[dict, dict]:
  """``(manifest, arrays)`` of the compact export of ``state``."""
  _check_step(step, state)
  compressed = _to_pure(step.compressed_params(state))
  dense = dict(_paths.leaf_paths(state.params))
  count = int(np.asarray(jax.device_get(state.step)))
  tstate = state.transform_state
  arrays: dict[str, np.ndarray] = {}
  leaves = []
  for i, (keys, path, leaf) in enumerate(_flatten(compressed, with_path_str=True)):
    c = np.asarray(jax.device_get(leaf))
    template = dense.get(path, leaf)
    try:
      settings = dict(step.transform.describe(path, template, tstate, count))
    except Exception as err:  # pylint: disable=broad-except
      settings = {"describe_error": f"{type(err).__name__}: {err}"}
    selected = bool(step.transform.select(path, template))
    if selected:
      factors = _find_factors(tstate.trainable, path)
      fmt, leaf_arrays = _encode_selected(c, settings, factors)
    else:
      fmt, leaf_arrays = {"kind": "raw"}, {"value": c}
    names = {}
    for role, arr in leaf_arrays.items():
      names[role] = f"p{i}.{role}"
      arrays[names[role]] = np.ascontiguousarray(arr)
    nonzero = int(np.count_nonzero(c))
    leaves.append({
        "path": path, "keys": keys, "shape": list(c.shape), "dtype": np.dtype(c.dtype).name,
        "selected": selected, "settings": _jsonable(settings) if selected else {},
        "format": _jsonable(fmt), "arrays": names,
        "dense_bytes": int(c.nbytes), "compressed_bytes": _nbytes(leaf_arrays),
        "sparsity": 1.0 - nonzero / c.size if c.size else 0.0,
    })
  model_state = []
  for j, (keys, leaf) in enumerate(_flatten(state.model_state)):
    name = f"s{j}"
    arrays[name] = np.asarray(jax.device_get(leaf))
    model_state.append({"keys": keys, "array": name})
  manifest = {"format": FORMAT, "version": VERSION, "kind": step.adapter.kind,
              "step": count, "leaves": leaves, "model_state": model_state}
  return manifest, arrays


def _storable(arrays: dict) -> tuple[dict, dict]:
  """Views non-numpy dtypes (bfloat16, ...) as unsigned ints; returns their dtype names."""
  out, views = {}, {}
  for name, arr in arrays.items():
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc" or np.dtype(arr.dtype.str) != arr.dtype:
      views[name] = str(arr.dtype)
      arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    out[name] = arr
  return out, views


def export(step, state, path: str | os.PathLike) -> "Summary":
  """Writes the compressed model (``beta = 0``) of ``state`` to ``path`` in compact form.

  The file is one ``.npz`` (written to a temporary file and moved into place, so a reader
  never sees a partial file); load it with :func:`load_compressed`. Pruned layers are stored
  as their non-zero values plus a bitmask, per-unit indices or n:m positions; binary layers
  as sign bits with their scale; k-bit layers as packed k-bit integers with per-channel
  scales; low-rank layers as their two factors. Every encoding is checked to decode to
  exactly ``step.compressed_params(state)`` (low-rank factors: to float tolerance).

  Args:
    step: the :class:`~vcon_jax.TrainStep` that trained ``state``.
    state: the train state.
    path: file to write (any name; ``.npz`` is conventional). Parent folders are created.

  Returns:
    The :class:`Summary` of what was written (per-layer sizes from the actual encodings).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"export path {path!r} is a directory; pass a file name such as "
                     f"{os.path.join(path, 'model.npz')!r}.")
  manifest, arrays = _encode_model(step, state)
  arrays, views = _storable(arrays)
  manifest["views"] = views
  blob = np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **{MANIFEST_KEY: blob}, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return _summary_from_manifest(manifest, file_bytes=os.path.getsize(path))


# ------------------------------------------------------------------------------ loading
def _read(path) -> tuple[dict, dict]:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No compact export at {path!r} (write one with "
                            f"vj.export(step, state, path)).")
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a directory; load_compressed needs the .npz file "
                     f"written by vj.export.")
  not_export = f"{path!r} is not a vcon_jax compact export (an .npz written by vj.export)"
  try:
    z = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
    raise ValueError(f"{not_export}: {err}") from err
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise ValueError(f"{not_export}: it holds a single array.")
  with z:
    if MANIFEST_KEY not in z.files:
      raise ValueError(f"{not_export}: no {MANIFEST_KEY!r} entry.")
    try:
      files = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
      raise ValueError(f"{not_export}: {err}") from err
  try:
    manifest = json.loads(files.pop(MANIFEST_KEY).tobytes().decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as err:
    raise ValueError(f"{path!r}: unreadable export manifest ({err}).") from err
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path!r} is not a vcon_jax compact export (format "
                     f"{manifest.get('format')!r}).")
  if manifest.get("version", 0) > VERSION:
    raise ValueError(f"{path!r} was written by a newer vcon_jax (format version "
                     f"{manifest['version']}; this one reads up to {VERSION}).")
  for name, dtype in manifest.get("views", {}).items():
    files[name] = files[name].view(jnp.dtype(dtype))
  return manifest, files


def _linen_interceptor(factors: dict, used: set):
  from flax import linen as nn
  from flax.linen import dtypes as linen_dtypes

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if (context.method_name != "__call__" or type(mod) is not nn.Dense or kwargs
        or len(args) != 1 or getattr(mod, "dot_general", None) is not None
        or getattr(mod, "dot_general_cls", None) is not None):
      return next_fun(*args, **kwargs)
    key = (*mod.path, "kernel")
    if key not in factors:
      return next_fun(*args, **kwargs)
    used.add(key)
    a, b = factors[key]
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    x, a, b, bias = linen_dtypes.promote_dtype(args[0], a, b, bias, dtype=mod.dtype)
    y = _thin_matmul(x, a, b, mod.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y

  return interceptor


def _thin_matmul(x, a, b, precision=None, preferred_element_type=None):
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  h = lax.dot_general(x, a, dims, precision=precision,
                      preferred_element_type=preferred_element_type)
  return lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _thin_dot_general(a, b):
  """A ``dot_general`` for an ``nnx.Linear`` that ignores its kernel and uses ``x A B``."""

  def dot_general(inputs, kernel, dimension_numbers, precision=None,
                  preferred_element_type=None, **unused):
    del dimension_numbers, unused
    return _thin_matmul(inputs, a.astype(kernel.dtype), b.astype(kernel.dtype), precision,
                        preferred_element_type)

  return dot_general


DECODE_MODES = ("once", "on_the_fly")


class _Runner:
  """``x -> logits`` of a loaded export; ``lower(x)`` gives the jitted computation.

  ``build(x)`` makes ``(jitted, arrays)`` at the first call: the ``"once"`` mode traces
  the model on ``x`` first to find the low-rank layers that run as thin matmuls.
  """

  def __init__(self, build: Callable, extra):
    self._build, self._extra = build, extra
    self._jitted = self._arrays = None

  def _ready(self, x):
    if self._jitted is None:
      self._jitted, self._arrays = self._build(x)
    return self._jitted

  def __call__(self, x):
    return self._ready(x)(self._arrays, self._extra, x)

  def lower(self, x):
    return self._ready(x).lower(self._arrays, self._extra, x)


class CompressedModel:
  """A compact export loaded by :func:`load_compressed`.

  * :meth:`params` decodes the dense-equivalent params (the tree of
    ``step.compressed_params(state)``);
  * :meth:`apply` / :meth:`apply_fn` run a model inside one ``jit``, with the k-bit,
    binary and sparse layers either decoded once to dense arrays kept on the device
    (``decode="once"``, the default: as fast as the dense model) or decoded from their
    packed form inside every call (``decode="on_the_fly"``: only the compact arrays stay
    on the device). In both, low-rank ``flax.linen.Dense`` / ``flax.nnx.Linear`` layers
    run as two thin matmuls ``(x @ A) @ B`` (the rebuilt ``A @ B`` is never formed).

  Attributes:
    manifest: the export's JSON manifest.
    arrays: the stored (compact) numpy arrays by name.
    kind: ``"linen"`` or ``"nnx"``, the kind of model that was exported.
    step: the train step count of the exported state.
  """

  def __init__(self, manifest: dict, arrays: dict, path: str | None = None):
    self.manifest = manifest
    self.arrays = arrays
    self.path = path
    self.kind = manifest["kind"]
    self.step = manifest.get("step")
    self._leaves = manifest["leaves"]
    self._dense: dict[int, jax.Array] = {}  # decoded leaves on the device: params(), "once"
    self._runtime: dict[int, tuple] = {}  # on-the-fly forms on the device
    self._apply_cache: dict = {}
    #: paths of the low-rank kernels the last traced :meth:`apply` ran as ``(x @ A) @ B``
    self.fast_layers: list[str] = []

  def __repr__(self):
    s = self.summary(print_fn=None).totals
    return (f"CompressedModel({self.kind}, {len(self._leaves)} leaves, "
            f"{s['compressed_bytes']} bytes of {s['dense_bytes']} dense"
            f"{f', from {self.path!r}' if self.path else ''})")

  # ------------------------------------------------------------------------ decoding
  def _stored(self, leaf) -> dict:
    return {role: self.arrays[name] for role, name in leaf["arrays"].items()}

  def _dense_leaf(self, i: int) -> jax.Array:
    """Leaf ``i`` decoded on the host (numpy: no compile) and put on the device, cached."""
    if i not in self._dense:
      leaf = self._leaves[i]
      value = _decode_leaf(np, leaf["format"], self._stored(leaf), leaf["shape"],
                           jnp.dtype(leaf["dtype"]))
      self._dense[i] = jnp.asarray(value)
    return self._dense[i]

  def _runtime_leaf(self, i: int) -> tuple[dict, dict]:
    """Leaf ``i`` as decoded inside a jitted call (:func:`_runtime_coded`), cached."""
    if i not in self._runtime:
      leaf = self._leaves[i]
      fmt, arrays = _runtime_coded(leaf["format"], self._stored(leaf), leaf["shape"])
      self._runtime[i] = (fmt, {k: jnp.asarray(v) for k, v in arrays.items()})
    return self._runtime[i]

  def _plan(self, decode: str, dense_keys=frozenset()) -> tuple[list, list]:
    """Per leaf, the (static) format and the device arrays a jitted call decodes.

    ``"once"``: every leaf dense except low-rank ones (their factors), unless in
    ``dense_keys`` (low-rank kernels not run as thin matmuls). ``"on_the_fly"``: the
    compact forms.
    """
    fmts, arrays = [], []
    for i, leaf in enumerate(self._leaves):
      kind = leaf["format"]["kind"]
      if kind == "low_rank" and tuple(leaf["keys"]) not in dense_keys:
        fmt, arr = self._runtime_leaf(i)
      elif kind == "raw" or decode == "once":
        fmt, arr = {"kind": "raw"}, {"value": self._dense_leaf(i)}
      else:
        fmt, arr = self._runtime_leaf(i)
      fmts.append(fmt)
      arrays.append(arr)
    return fmts, arrays

  def _decode_all(self, fmts, arrays) -> dict:
    return _unflatten([
        (leaf["keys"], _decode_leaf(jnp, fmt, arr, leaf["shape"], jnp.dtype(leaf["dtype"])))
        for leaf, fmt, arr in zip(self._leaves, fmts, arrays)])

  def _factors(self, fmts, arrays) -> dict:
    return {tuple(leaf["keys"]): (arr["a"], arr["b"])
            for leaf, fmt, arr in zip(self._leaves, fmts, arrays)
            if fmt["kind"] == "low_rank"}

  def params(self, model: Any = None) -> Any:
    """The dense-equivalent params, the tree of ``step.compressed_params(state)``.

    Decoded on the host once and kept on the device (the same arrays a
    ``decode="once"`` :meth:`apply` runs on).

    Args:
      model: optional. For an NNX module the result is an ``nnx.State`` (for
        ``nnx.update(model, ...)``); otherwise a nested dict (Linen's ``params``; NNX's
        ``nnx.update`` also takes it).
    """
    params = _unflatten([(leaf["keys"], self._dense_leaf(i))
                         for i, leaf in enumerate(self._leaves)])
    if model is not None and self.kind == "nnx":
      from flax import nnx
      if isinstance(model, nnx.Module):
        state = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
        nnx.replace_by_pure_dict(state, params)
        return state
    return params

  def model_state(self) -> dict:
    """The exported non-param state (Linen collections such as ``batch_stats``; NNX
    BatchNorm statistics and rng counters) as a nested dict."""
    return _unflatten([(e["keys"], jnp.asarray(self.arrays[e["array"]]))
                       for e in self.manifest["model_state"]])

  # -------------------------------------------------------------------------- running
  def apply_fn(self, model: Any, *, decode: str = "once", **kwargs) -> Callable:
    """A jitted ``x -> logits`` running ``model`` (eval mode) on this export.

    ``model`` is the same architecture that was exported (a ``flax.linen.Module`` or an
    ``nnx.Module``; the NNX module's structure and its non-exported state are read now).

    Args:
      model: the Linen or NNX model.
      decode: where the k-bit, binary and sparse layers are decoded.

        * ``"once"`` (default): on the host at the first call, to dense arrays of the
          model's dtype that stay on the device (cached on this object and shared with
          :meth:`params`); every call then runs the plain dense model. Fastest; device
          memory of the dense model for those layers.
        * ``"on_the_fly"``: inside every jitted call, from the packed arrays (which are
          all that stays on the device; sparse layers as their values and ``int32``
          positions, 4 bytes per kept value more than the file's bitmask). Saves device
          memory between calls, but each call writes every such layer's dense kernel
          (transient, one layer at a time in XLA's schedule) before its matmul: on CPU
          several times slower than ``"once"`` at small batches.

        In both modes low-rank ``flax.linen.Dense`` / ``flax.nnx.Linear`` layers run as
        two thin matmuls ``(x @ A) @ B`` from their factors (see :attr:`fast_layers`);
        other low-rank layers (convs, ``DenseGeneral``, einsums) use the kernel ``A @ B``,
        formed once (``"once"``) or in every call (``"on_the_fly"``).
      **kwargs: passed to a Linen model's ``apply`` (e.g. ``train=False``).
    """
    from flax import linen as nn
    from flax import nnx
    if decode not in DECODE_MODES:
      raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}.")
    if isinstance(model, nnx.Module):
      if kwargs:
        raise ValueError("keyword arguments are for Linen models' apply; an NNX module is "
                         "run in eval mode as it is.")
      return self._nnx_apply_fn(model, decode)
    if isinstance(model, nn.Module):
      return self._linen_apply_fn(model, kwargs, decode)
    raise ValueError(f"model must be a flax.linen.Module or a flax.nnx.Module, got "
                     f"{type(model).__name__}.")

  def apply(self, model: Any, x: Any, *, decode: str = "once", **kwargs) -> jax.Array:
    """Logits of ``model`` on ``x`` from this export (see :meth:`apply_fn`; the jitted
    function is kept per model, ``decode`` mode and keyword arguments)."""
    try:
      key = (id(model), decode, tuple(sorted(kwargs.items())))
      hash(key)
    except TypeError:
      return self.apply_fn(model, decode=decode, **kwargs)(x)
    if key not in self._apply_cache:
      self._apply_cache[key] = (model, self.apply_fn(model, decode=decode, **kwargs))
    return self._apply_cache[key][1](x)

  def _runner(self, make_run: Callable, extra, decode: str) -> _Runner:
    """``make_run(fmts, used)`` gives ``run(arrays, extra, x)``, which adds the keys of
    the low-rank kernels it runs as thin matmuls to the set ``used``."""
    low_rank = {tuple(leaf["keys"]) for leaf in self._leaves
                if leaf["format"]["kind"] == "low_rank"}

    def build(x):
      used: set = set()
      fmts, arrays = self._plan(decode)
      if decode == "once" and low_rank:
        # which low-rank kernels run as thin matmuls: a trace, no compile; the others are
        # formed once here rather than in every call
        jax.eval_shape(make_run(fmts, used), arrays, extra, x)
        if low_rank - used:
          fmts, arrays = self._plan(decode, dense_keys=frozenset(low_rank - used))
      return jax.jit(make_run(fmts, used)), arrays

    return _Runner(build, extra)

  def _linen_apply_fn(self, model, kwargs, decode):
    from flax import linen as nn
    if self.kind != "linen":
      raise ValueError("this export is of an NNX model; pass the nnx.Module.")

    def make_run(fmts, used):
      def run(arrays, model_state, x):
        params = self._decode_all(fmts, arrays)
        used.clear()
        with nn.intercept_methods(_linen_interceptor(self._factors(fmts, arrays), used)):
          out = model.apply({"params": params, **model_state}, x, **kwargs)
        self.fast_layers = sorted("/".join(map(str, k)) for k in used)
        return out
      return run

    return self._runner(make_run, self.model_state(), decode)

  def _nnx_apply_fn(self, model, decode):
    from flax import nnx
    if self.kind != "nnx":
      raise ValueError("this export is of a Linen model; pass the flax.linen.Module.")
    graphdef, pstate, rest = nnx.split(model, nnx.Param, ...)
    rest = jax.tree.map(lambda x: x, rest)  # a copy: the module's own state stays as it is
    expected = {tuple(k): tuple(np.shape(v)) for k, v in _flatten(pstate.to_pure_dict())}
    stored = {tuple(leaf["keys"]): tuple(leaf["shape"]) for leaf in self._leaves}
    if expected != stored:
      diff = sorted({"/".join(map(str, k)) for k in set(expected) ^ set(stored)} | {
          "/".join(map(str, k)) for k in set(expected) & set(stored)
          if expected[k] != stored[k]})
      raise ValueError(f"the model's params do not match the export (differing leaves: "
                       f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}).")
    template = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), pstate)
    # exported model state (BatchNorm statistics) replaces the module's; rng keys stay
    exported = {tuple(e["keys"]): self.arrays[e["array"]] for e in self.manifest["model_state"]}
    rest_pure = rest.to_pure_dict()
    merged = []
    for keys, leaf in _flatten(rest_pure):
      new = exported.get(tuple(keys))
      is_key = jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key)
      if new is not None and not is_key and np.shape(new) == np.shape(leaf):
        leaf = jnp.asarray(new, dtype=leaf.dtype)
      merged.append((keys, leaf))
    nnx.replace_by_pure_dict(rest, _unflatten(merged))

    def make_run(fmts, used):
      def run(arrays, rest, x):
        pure = self._decode_all(fmts, arrays)
        state = jax.tree.map(lambda s: s, template)
        nnx.replace_by_pure_dict(state, pure)
        module = nnx.merge(graphdef, state, rest)
        module.eval()
        factors = self._factors(fmts, arrays)
        used.clear()
        for path, sub in nnx.iter_modules(module):
          key = (*path, "kernel")
          if (type(sub) is nnx.Linear and key in factors
              and getattr(sub, "dot_general", None) is lax.dot_general):
            sub.dot_general = _thin_dot_general(*factors[key])
            used.add(key)
        self.fast_layers = sorted("/".join(map(str, k)) for k in used)
        return module(x)
      return run

    return self._runner(make_run, rest, decode)

  def summary(self, print_fn: Callable | None = print) -> "Summary":
    """The per-layer size table of this export (see :func:`summary`)."""
    file_bytes = os.path.getsize(self.path) if self.path and os.path.exists(self.path) \
        else None
    out = _summary_from_manifest(self.manifest, file_bytes=file_bytes)
    if print_fn is not None:
      print_fn(out.table())
    return out


def load_compressed(path: str | os.PathLike) -> CompressedModel:
  """Loads a compact export written by :func:`export`.

  >>> model = vj.load_compressed("model.npz")              # doctest: +SKIP
  >>> logits = model.apply(flax_model, x)                  # doctest: +SKIP
  >>> params = model.params()                              # doctest: +SKIP

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is not a vcon_jax compact export.
  """
  manifest, arrays = _read(path)
  return CompressedModel(manifest, arrays, os.fspath(path))


# ------------------------------------------------------------------------------ summary
class Summary(list):
  """Rows (one dict per param leaf) of a compact export, with :attr:`totals`.

  Row keys: ``name``, ``shape``, ``dtype``, ``transform`` (empty for untouched leaves),
  ``format``, ``sparsity`` (fraction of zeros), ``bits`` (of the stored values; ``None``
  for low-rank and untouched leaves), ``rank``, ``dense_bytes`` (the leaf in its own dtype,
  i.e. fp32 bytes for an fp32 model), ``compressed_bytes`` (of the stored encoding) and
  ``ratio``. ``totals`` sums the bytes over all leaves and over the compressed (selected)
  ones (``compressed_layers_*``), and has ``file_bytes`` when read from a file.
  """

  def __init__(self, rows, totals):
    super().__init__(rows)
    self.totals = totals

  def table(self) -> str:
    head = ["name", "shape", "transform", "format", "sparsity", "bits", "rank", "dense",
            "compressed", "ratio"]
    lines = [head]
    for r in self:
      lines.append([
          r["name"], "x".join(map(str, r["shape"])) or "()", r["transform"] or "-",
          r["format"], f"{r['sparsity']:.3f}" if r["transform"] else "-",
          "-" if r["bits"] is None else str(r["bits"]),
          "-" if r["rank"] is None else str(r["rank"]), _human(r["dense_bytes"]),
          _human(r["compressed_bytes"]), f"{r['ratio']:.4f}"])
    t = self.totals
    lines.append(["compressed layers", "", "", "", "", "", "",
                  _human(t["compressed_layers_dense_bytes"]),
                  _human(t["compressed_layers_bytes"]),
                  f"{t['compressed_layers_ratio']:.4f}"])
    lines.append(["total", "", "", "", "", "", "", _human(t["dense_bytes"]),
                  _human(t["compressed_bytes"]), f"{t['ratio']:.4f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    right = {4, 5, 6, 7, 8, 9}
    out = []
    for n, row in enumerate(lines):
      cells = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(row, widths))]
      out.append("  ".join(cells).rstrip())
      if n == 0 or n == len(lines) - 3:
        out.append("  ".join("-" * w for w in widths))
    if t.get("file_bytes") is not None:
      out.append(f"file: {_human(t['file_bytes'])} ({t['file_bytes']} bytes)")
    return "\n".join(out)

  def __str__(self):
    return self.table()


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def _summary_from_manifest(manifest: dict, file_bytes: int | None = None) -> Summary:
  rows = []
  for leaf in manifest["leaves"]:
    fmt = leaf["format"]
    bits = None
    if fmt["kind"] == "coded":
      bits = int(fmt["bits"]) if fmt["codec"] != "float" else np.dtype(
          jnp.dtype(leaf["dtype"])).itemsize * 8
    rows.append({
        "name": leaf["path"], "shape": tuple(leaf["shape"]), "dtype": leaf["dtype"],
        "transform": (leaf["settings"].get("transform") or "custom") if leaf["selected"]
                     else "",
        "settings": leaf["settings"], "format": _format_name(fmt, jnp.dtype(leaf["dtype"])),
        "sparsity": float(leaf["sparsity"]), "bits": bits,
        "rank": fmt.get("rank") if fmt["kind"] == "low_rank" else None,
        "dense_bytes": int(leaf["dense_bytes"]),
        "compressed_bytes": int(leaf["compressed_bytes"]),
        "ratio": leaf["compressed_bytes"] / leaf["dense_bytes"] if leaf["dense_bytes"] else 1.0,
    })
  dense = sum(r["dense_bytes"] for r in rows)
  comp = sum(r["compressed_bytes"] for r in rows)
  sel = [r for r in rows if r["transform"]]
  sel_dense = sum(r["dense_bytes"] for r in sel)
  sel_comp = sum(r["compressed_bytes"] for r in sel)
  totals = {"dense_bytes": dense, "compressed_bytes": comp,
            "ratio": comp / dense if dense else 1.0,
            "compressed_layers_dense_bytes": sel_dense, "compressed_layers_bytes": sel_comp,
            "compressed_layers_ratio": sel_comp / sel_dense if sel_dense else 1.0,
            "file_bytes": file_bytes}
  return Summary(rows, totals)


def summary(target: Any, state: Any = None, *, print_fn: Callable | None = print) -> Summary:
  """Per-layer size table of a compressed model; printed, and returned as data.

  Args:
    target: a :class:`~vcon_jax.TrainStep` (with ``state``), a path written by
      :func:`export`, or a :class:`CompressedModel`.
    state: the train state when ``target`` is a step.
    print_fn: called with the table text (default ``print``); ``None`` to only return it.

  Returns:
    A :class:`Summary`: a list of row dicts (name, shape, transform, format, sparsity,
    bits, rank, dense_bytes, compressed_bytes, ratio) with ``.totals`` and ``.table()``.
    Sizes come from the actual export encodings.
  """
  if isinstance(target, CompressedModel):
    return target.summary(print_fn=print_fn)
  if isinstance(target, (str, os.PathLike)):
    return load_compressed(target).summary(print_fn=print_fn)
  if state is None:
    raise ValueError("summary(step, state) needs the train state (or pass an export path).")
  manifest, _ = _encode_model(target, state)
  out = _summary_from_manifest(manifest)
  if print_fn is not None:
    print_fn(out.table())
  return out
