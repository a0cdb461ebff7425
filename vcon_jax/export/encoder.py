"""The exact-fit encoding search: the smallest stored form of each compressed leaf.

Every selected leaf, viewed as a ``(fan_in, fan_out)`` matrix, gets the smallest of these
encodings that reproduces its values *exactly* (each candidate is decoded and compared
before it is chosen; a leaf nothing fits is stored as it is):

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

The transform's own description of the leaf chooses which encodings to try; the values
themselves decide which one is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vcon_jax import _paths
from vcon_jax.export import codec, format as fmt_lib

_SHIFT_CANDIDATES = (0, 1, -1, 2, -2, 3, -3)
_MAX_INT_BITS = 16


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
  return codec.pack(sign.astype(np.uint8), 1), scale


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
  return codec.pack((q + levels).astype(np.uint32), bits), chosen


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
               {"nm_index": codec.pack(order.reshape(-1).astype(np.uint32),
                                       codec.nm_bits(m))},
               vals, vcol)
  nonzero = units != 0
  nnz = int(nonzero.sum())
  if nnz < mat.size:
    counts = nonzero.sum(axis=1)
    vals = units[nonzero]
    vcol = np.repeat(np.arange(fan_out, dtype=np.int32), counts)
    mask_bytes = (mat.size + 7) // 8
    index_bytes = (fan_out * codec.count_dtype(fan_in).itemsize
                   + nnz * codec.index_dtype(fan_in).itemsize)
    if mask_bytes <= index_bytes:
      yield ({"layout": "bitmask"}, {"mask": np.packbits(nonzero.reshape(-1))}, vals, vcol)
    else:
      indices = np.nonzero(nonzero)[1].astype(codec.index_dtype(fan_in))
      yield ({"layout": "indices"},
             {"counts": counts.astype(codec.count_dtype(fan_in)), "indices": indices},
             vals, vcol)


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


def encode_selected(c: np.ndarray, settings: Mapping, factors):
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
    for cdc, codec_arrays in _codecs(vals, vcol, fan_out, c.dtype, bits_options,
                                     layer_first):
      arrays = {**layout_arrays, **codec_arrays}
      size = codec.nbytes(arrays)
      if size < best_bytes:
        fmt = {"kind": "coded", **layout, **cdc, "count": int(vals.size)}
        decoded = codec.decode_coded(np, fmt, arrays, fan_in, fan_out, c.dtype)
        if _same(decoded.reshape(c.shape), c):
          best, best_bytes = (fmt, arrays), size
  return best


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


def flatten(tree) -> list[tuple]:
  """``(keys, path, leaf)`` triples: JSON keys, the transform's path string and the leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(_key_list(p), _paths.path_str(p), leaf) for p, leaf in flat]


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


def encode_model(step: Any, state: Any) -> tuple[dict, dict]:
  """``(manifest, arrays)`` of the compact export of ``state`` (see ``format``)."""
  _check_step(step, state)
  compressed = _to_pure(step.compressed_params(state))
  dense = dict(_paths.leaf_paths(state.params))
  count = int(np.asarray(jax.device_get(state.step)))
  tstate = state.transform_state
  arrays: dict[str, np.ndarray] = {}
  leaves = []
  for i, (keys, path, leaf) in enumerate(flatten(compressed)):
    c = np.asarray(jax.device_get(leaf))
    template = dense.get(path, leaf)
    try:
      settings = dict(step.transform.describe(path, template, tstate, count))
    except Exception as err:  # pylint: disable=broad-except
      settings = {"describe_error": f"{type(err).__name__}: {err}"}
    selected = bool(step.transform.select(path, template))
    if selected:
      factors = _find_factors(tstate.trainable, path)
      fmt, leaf_arrays = encode_selected(c, settings, factors)
    else:
      fmt, leaf_arrays = {"kind": "raw"}, {"value": c}
    names = {}
    for role, arr in leaf_arrays.items():
      names[role] = f"p{i}.{role}"
      arrays[names[role]] = np.ascontiguousarray(arr)
    nonzero = int(np.count_nonzero(c))
    leaves.append({
        "path": path, "keys": keys, "shape": list(c.shape), "dtype": np.dtype(c.dtype).name,
        "selected": selected, "settings": fmt_lib.jsonable(settings) if selected else {},
        "format": fmt_lib.jsonable(fmt), "arrays": names,
        "dense_bytes": int(c.nbytes), "compressed_bytes": codec.nbytes(leaf_arrays),
        "sparsity": 1.0 - nonzero / c.size if c.size else 0.0,
    })
  model_state = []
  for j, (keys, _, leaf) in enumerate(flatten(state.model_state)):
    name = f"s{j}"
    arrays[name] = np.asarray(jax.device_get(leaf))
    model_state.append({"keys": keys, "array": name})
  manifest = {"format": fmt_lib.FORMAT, "version": fmt_lib.VERSION, "kind": step.adapter.kind,
              "step": count, "leaves": leaves, "model_state": model_state}
  return manifest, arrays
