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
  one scale per layer, per output unit or per group of inputs of each output unit);
  ``int<k>`` (``k``-bit codes packed into bytes, ``q * scale`` with one float32 scale per
  output unit, per layer or per group; asymmetric codes also store an integer zero point
  per scale).
* **low rank**: a leaf whose last spec carries factors is stored as them, ``A``
  (fan_in x r) and ``B`` (r x fan_out), when their product matches its values.

The transform's own description of the leaf (a tuple of :class:`~vcon_jax.LeafSpec` from
``Transform.describe``: bits, per-channel scales, n:m pattern, low-rank factors) chooses
which encodings to try; the values themselves decide which one is exact.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vcon_jax import _paths, _spec
from vcon_jax._checks import check_not_replicated
from vcon_jax._core import compressed_view
from vcon_jax._model import make_adapter, model_kind
from vcon_jax._optax_wrapper import unwrap_state, vcon_state
from vcon_jax._selection import caller_level
from vcon_jax._spec import LeafSpec
from vcon_jax.export import codec, format as fmt_lib

_SHIFT_CANDIDATES = (0, 1, -1, 2, -2, 3, -3)
#: Narrower dtypes a scale array is stored in when it holds exactly (2 bytes a scale).
_NARROW_SCALES = (np.float16, jnp.bfloat16)
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


def _fit_int(v, col, ncol, bits, dtype, symmetric=True):
  """``bits``-bit codes and scales reproducing ``v`` as ``q * scale`` exactly, or ``None``.

  ``col`` gives each value's scale (``ncol`` of them). Symmetric codes are ``q + L`` with
  ``|q| <= L = 2**(bits-1) - 1``; asymmetric ones ``q + zero`` in ``[0, 2**bits - 1]``
  with an integer ``zero`` per scale, returned as a third array.

  Candidate scales per group: its largest magnitude over ``L`` (the symmetric quantiser's
  own ``max|w| / L`` up to rounding), or for asymmetric codes its range over
  ``2**bits - 1`` and its smallest gap between distinct values; then the middle of the
  interval of scales that round every ``q * scale`` to its stored value (needed for
  bfloat16 and other short dtypes); each nudged by up to three float32 ulps, and the first
  that reproduces the group is kept.
  """
  vf = v.astype(np.float32)
  if symmetric:
    levels = 2 ** (bits - 1) - 1
    lo_q, hi_q = -levels, levels
    starts = [_column_max(np.abs(vf), col, ncol) / np.float32(levels)]
  else:
    top = 2 ** bits - 1
    lo_q, hi_q = -top, top  # the span is checked per group below
    hi = _column_max(np.maximum(vf, 0), col, ncol)
    lo = -_column_max(np.maximum(-vf, 0), col, ncol)
    starts = [((hi - lo) / np.float32(top)).astype(np.float32), _min_gap(vf, col, ncol)]
  bases = []
  for base in starts:
    base = np.where(base > 0, base, np.float32(1.0)).astype(np.float32)
    bases.append(base)
    q0 = np.clip(np.rint(vf / base[col]), lo_q, hi_q)
    nz = q0 != 0
    if nz.any():
      lo_v, hi_v = _rounding_interval(np.abs(v[nz]))
      qa = np.abs(q0[nz]).astype(np.float64)
      s_lo = np.full((ncol,), -np.inf)
      s_hi = np.full((ncol,), np.inf)
      np.maximum.at(s_lo, col[nz], lo_v / qa)
      np.minimum.at(s_hi, col[nz], hi_v / qa)
      good = np.isfinite(s_lo) & np.isfinite(s_hi) & (s_lo <= s_hi)
      mid = np.where(good, (np.where(good, s_lo, 0) + np.where(good, s_hi, 0)) / 2, base)
      bases.append(mid.astype(np.float32))

  def codes_of(sc):
    q = np.clip(np.rint(vf / sc[col]), lo_q, hi_q)
    ok = (q.astype(np.float32) * sc[col]).astype(dtype) == v
    if symmetric:
      return q, ok, None
    qmin = np.zeros((ncol,), np.float32)
    np.minimum.at(qmin, col, q)
    zero = -qmin  # >= 0: the lowest code of each group is 0 (or above, if all q > 0)
    ok &= q + zero[col] <= top
    return q, ok, zero

  # Scales that fit in 2 bytes first (a quantiser with scale_dtype rounds to them; the
  # export then stores them narrow), as they are; then float32 ones, nudged by ulps.
  with np.errstate(over="ignore"):
    narrow = [(b.astype(dt).astype(np.float32), (0,)) for b in bases for dt in _NARROW_SCALES]
  chosen = np.full((ncol,), np.nan, np.float32)
  for start, shifts in narrow + [(b, _SHIFT_CANDIDATES) for b in bases]:
    for shift in shifts:
      s = start
      direction = np.float32(np.inf if shift > 0 else -np.inf)
      for _ in range(abs(shift)):
        s = np.nextafter(s, direction).astype(np.float32)
      _, ok, _ = codes_of(s)
      bad = np.bincount(col[~ok], minlength=ncol) > 0 if not ok.all() else np.zeros(ncol, bool)
      fresh = ~bad & np.isnan(chosen)
      chosen[fresh] = s[fresh]
      if not np.isnan(chosen).any():
        break
    if not np.isnan(chosen).any():
      break
  if np.isnan(chosen).any():
    return None
  q, ok, zero = codes_of(chosen)
  if not ok.all():
    return None
  if symmetric:
    return codec.pack((q + levels).astype(np.uint32), bits), chosen, None
  return (codec.pack((q + zero[col]).astype(np.uint32), bits), chosen,
          zero.astype(codec.zero_dtype(bits)))


def _min_gap(vf, col, ncol):
  """Per scale group, the smallest positive gap between its distinct values (0: none)."""
  order = np.lexsort((vf, col))
  sv, sc = vf[order], col[order]
  gap = np.diff(sv)
  same = (sc[1:] == sc[:-1]) & (gap > 0)
  out = np.full((ncol,), np.inf, np.float32)
  np.minimum.at(out, sc[1:][same], gap[same])
  return np.where(np.isfinite(out), out, 0).astype(np.float32)


def _scale_modes(vrow, vcol, fan_in, fan_out, group_size, layer_first):
  """``(fmt fields, scale index of each value, number of scales, stored shape)`` of each
  way of sharing scales: per layer, per output unit (``layer_first`` orders those two),
  or, given ``group_size``, per group of inputs of each output unit only."""
  if group_size is not None:
    if not 0 < group_size <= fan_in or fan_in % group_size:
      return []
    groups = fan_in // group_size
    return [({"scale": "group", "group_size": int(group_size)},
             (vrow // group_size) * fan_out + vcol, groups * fan_out, (groups, fan_out))]
  layer = ({"scale": "layer"}, np.zeros_like(vcol), 1, ())
  channel = ({"scale": "channel"}, vcol, fan_out, (fan_out,))
  return [layer, channel] if layer_first else [channel, layer]


def _narrow(scale: np.ndarray) -> np.ndarray:
  """``scale`` (float32) in float16 or bfloat16 when that holds it exactly."""
  for dt in _NARROW_SCALES:
    with np.errstate(over="ignore"):
      narrow = scale.astype(dt)
    if np.array_equal(narrow.astype(np.float32), scale):
      return narrow
  return scale


def _codecs(v, modes, dtype, bits_options, symmetric):
  """Yields ``(fmt, arrays)`` for every codec that reproduces ``v`` exactly.

  Binary is always tried (symmetric codes only); of ``bits_options`` the smallest width
  that fits is yielded. ``modes`` (:func:`_scale_modes`) are tried in order.
  """
  yield {"codec": "float"}, {"values": v}
  if not jnp.issubdtype(dtype, jnp.floating) or v.dtype != dtype:
    return
  if symmetric:
    for fields, idx, n, shape in modes:  # binary: one sign bit per value
      fit = _fit_binary(v, idx, n, dtype)
      if fit is not None:
        codes, scale = fit
        yield ({"codec": "binary", "bits": 1, **fields},
               {"codes": codes, "scale": np.asarray(scale, np.float32).reshape(shape)})
        break
  for bits in bits_options:
    for fields, idx, n, shape in modes:
      fit = _fit_int(v, idx, n, bits, dtype, symmetric)
      if fit is not None:
        codes, scale, zero = fit
        arrays = {"codes": codes,
                  "scale": _narrow(np.asarray(scale, np.float32).reshape(shape))}
        extra = {}
        if zero is not None:
          arrays["zero"] = zero.reshape(shape)
          extra = {"zero_point": True}
        yield {"codec": "int", "bits": bits, **fields, **extra}, arrays
        break
    else:
      continue
    break  # the smallest bit width that fits


def _layouts(mat: np.ndarray, pattern: tuple[int, int] | None):
  """Yields ``(fmt, arrays, values, value_rows, value_columns)`` for each applicable
  layout (rows and columns of the stored values in the ``(fan_in, fan_out)`` matrix)."""
  fan_in, fan_out = mat.shape
  col = np.broadcast_to(np.arange(fan_out, dtype=np.int32), mat.shape).reshape(-1)
  row = np.repeat(np.arange(fan_in, dtype=np.int32), fan_out)
  yield {"layout": "dense"}, {}, mat.reshape(-1), row, col
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
        vrow = (np.arange(fan_in // m, dtype=np.int32)[None, :, None] * m
                + order).reshape(-1).astype(np.int32)
        yield ({"layout": "nm", "n": n, "m": m},
               {"nm_index": codec.pack(order.reshape(-1).astype(np.uint32),
                                       codec.nm_bits(m))},
               vals, vrow, vcol)
  nonzero = units != 0
  nnz = int(nonzero.sum())
  if nnz < mat.size:
    counts = nonzero.sum(axis=1)
    vals = units[nonzero]
    vcol = np.repeat(np.arange(fan_out, dtype=np.int32), counts)
    vrow = np.nonzero(nonzero)[1].astype(np.int32)
    mask_bytes = (mat.size + 7) // 8
    index_bytes = (fan_out * codec.count_dtype(fan_in).itemsize
                   + nnz * codec.index_dtype(fan_in).itemsize)
    if mask_bytes <= index_bytes:
      yield ({"layout": "bitmask"}, {"mask": np.packbits(nonzero.reshape(-1))}, vals, vrow,
             vcol)
    else:
      yield ({"layout": "indices"},
             {"counts": counts.astype(codec.count_dtype(fan_in)),
              "indices": vrow.astype(codec.index_dtype(fan_in))},
             vals, vrow, vcol)


def _bits_options(specs: tuple[LeafSpec, ...], values: np.ndarray, fan_out: int
                  ) -> list[int]:
  """The k-bit widths to try: the specs' ``bits``; with no spec at all, 2 to 8 if the values
  can be such codes (at most ``2**(k-1)`` distinct magnitudes per output unit, so at most
  ``128 * fan_out + 1`` in all, and fewer than half the values)."""
  bits = _spec.last(specs, "bits")
  if bits is not None:
    return [int(bits)] if 2 <= bits <= _MAX_INT_BITS else []
  if specs:  # described, and not quantised
    return []
  distinct = np.unique(np.abs(values)).size if values.size else 0
  if 0 < distinct <= min(values.size // 2, 128 * fan_out + 1):
    return list(range(2, 9))
  return []


def _encode_low_rank(c: np.ndarray, a: np.ndarray, b: np.ndarray, rank: int | None,
                     in_axes: tuple[int, ...] | None):
  if rank is not None and 0 < rank < a.shape[1]:
    a, b = a[:, :rank], b[:rank]
  fan_in, fan_out = _paths.matricize_shape(c.shape, in_axes)
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
  err = np.abs(prod - _paths.to_matrix(c, in_axes).astype(np.float64))
  if not np.all(err <= tol * (bound.max(initial=0.0) + 1e-30)):
    return None
  return ({"kind": "low_rank", "rank": int(a.shape[1]), **_axes_field(in_axes)},
          {"a": np.ascontiguousarray(a), "b": np.ascontiguousarray(b)})


def _axes_field(in_axes: tuple[int, ...] | None) -> dict:
  """The format's ``in_axes`` entry: present only when the matrix view is not Flax's
  default (every axis but the last), so ordinary kernels' manifests are unchanged."""
  return {} if in_axes is None else {"in_axes": [int(a) for a in in_axes]}


def encode_selected(c: np.ndarray, specs: tuple[LeafSpec, ...]):
  """The smallest exact encoding of one compressed leaf: ``(fmt, arrays)``.

  Args:
    c: the leaf's compressed values.
    specs: what the transform did to it (``Transform.describe``), ``()`` if unknown.
  """
  in_axes = _spec.last(specs, "in_axes")
  if specs and specs[-1].factors is not None:
    a, b = (np.asarray(jax.device_get(f)) for f in specs[-1].factors)
    enc = _encode_low_rank(c, a, b, specs[-1].rank, specs[-1].in_axes)
    if enc is not None:
      return enc
  best = ({"kind": "raw"}, {"value": c})
  if c.ndim == 0 or c.size == 0:
    return best
  fan_in, fan_out = _paths.matricize_shape(c.shape, in_axes)
  mat = _paths.to_matrix(c, in_axes)
  best_bytes = c.nbytes
  bits_options = _bits_options(specs, mat, fan_out)
  layer_first = not _spec.last(specs, "per_channel")
  group_size = _spec.last(specs, "group_size")
  symmetric = _spec.last(specs, "symmetric") is not False
  pattern = _spec.last(specs, "pattern")
  for layout, layout_arrays, vals, vrow, vcol in _layouts(mat, pattern):
    modes = _scale_modes(vrow, vcol, fan_in, fan_out, group_size, layer_first)
    for cdc, codec_arrays in _codecs(vals, modes, c.dtype, bits_options, symmetric):
      arrays = {**layout_arrays, **codec_arrays}
      size = codec.nbytes(arrays)
      if size < best_bytes:
        fmt = {"kind": "coded", **layout, **cdc, "count": int(vals.size),
               **_axes_field(in_axes)}
        decoded = codec.decode_coded(np, fmt, arrays, fan_in, fan_out, c.dtype)
        if _same(_paths.from_matrix(decoded, c.shape, in_axes), c):
          best, best_bytes = (fmt, arrays), size
  return best


def describe(transform: Any, path: str, leaf: Any, tstate: Any, count: int
             ) -> tuple[tuple[LeafSpec, ...], dict]:
  """``(specs, settings)`` of one selected leaf; settings is the manifest's JSON record.

  A ``describe`` that raises or returns anything but a tuple of :class:`LeafSpec` counts
  as no description (the error is kept in the settings).
  """
  try:
    specs = transform.describe(path, leaf, tstate, count)
    if not isinstance(specs, tuple) or not all(isinstance(s, LeafSpec) for s in specs):
      raise TypeError(f"Transform.describe must return a tuple of vcon_jax.LeafSpec, got "
                      f"{type(specs).__name__}.")
    error = None
  except Exception as err:  # pylint: disable=broad-except
    specs, error = (), f"{type(err).__name__}: {err}"
  settings = {"transform": "+".join(s.kind for s in specs),
              "specs": [s.settings() for s in specs]}
  if error is not None:
    settings["describe_error"] = error
  return specs, settings


def flatten(tree) -> list[tuple]:
  """``(keys, path, leaf)`` triples: JSON keys, the transform's path string and the leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(_paths.path_keys(p), _paths.path_str(p), leaf) for p, leaf in flat]


def _to_pure(tree):
  return tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree


def is_train_step(x: Any) -> bool:
  """Whether ``x`` is (duck-typed as) a :class:`~vcon_jax.TrainStep`."""
  return all(hasattr(x, a) for a in ("transform", "compressed_params", "adapter"))


def legacy_step_call(name: str, first: Any, rest: tuple, model: Any) -> tuple:
  """``(state, path, model)`` of ``export`` / ``summary``: from the one signature
  ``(state, path, model=)``, or from the 0.3 spelling ``(step, state, path)`` (a
  ``DeprecationWarning`` naming the new one)."""
  rest = tuple(rest) + (None, None)
  if not is_train_step(first):
    if rest[1] is not None:
      raise ValueError(f"{name} takes (state, path, model=...): a train state or a "
                       f"wrap_optax opt_state, then the path; got {type(first).__name__!r} "
                       f"and three positional arguments.")
    return first, rest[0], model
  warnings.warn(f"{name}(step, state, ...) is deprecated; pass {name}(state, ..., "
                f"model=step.model).", DeprecationWarning, stacklevel=caller_level())
  if model is not None:
    raise ValueError(f"{name}(step, state, ...) takes the model from the step; model= is "
                     f"for {name}(state, ..., model=...).")
  step, state = first, rest[0]
  if state is None or not hasattr(state, "params") or not hasattr(state, "transform_state"):
    raise ValueError(f"{name}(step, state) needs the TrainState from step.init / "
                     f"step(...), got {type(state).__name__}.")
  return state, rest[1], step.model


def roles_of(transform: Any) -> dict | None:
  """What each leaf is, from the trace that selected ``transform``'s leaves (``None``
  when it selected by names): ``vj.summary``'s role column, on every path."""
  sel = getattr(transform, "selection", None)
  return None if sel is None else sel.roles


def encode_state(state: Any, model: Any, model_state: Any = None) -> tuple[dict, dict]:
  """``(manifest, arrays)`` of the compressed model of a train state or of a
  :func:`~vcon_jax.wrap_optax` loop's ``opt_state`` (found inside chains,
  ``MultiSteps``, ``nnx.Optimizer``).

  ``model`` (the Linen or NNX module) names the kind of model; the model state is the
  train state's, else ``model_state``: Linen's other collections (``{"batch_stats":
  ...}``, default none), or for NNX the module's non-param state (default: read from
  ``model``, e.g. the BatchNorm statistics an ``nnx.Optimizer`` loop keeps in it).
  """
  if model is None:
    raise ValueError("export/summary need the model: pass model=your_module (the Linen or "
                     "NNX module the params belong to).")
  try:
    vstate = unwrap_state(vcon_state(state))
  except ValueError as err:
    raise ValueError(f"export/summary take the state of vj.make_train_step or the "
                     f"opt_state of a vj.wrap_optax loop: {err}") from None
  check_not_replicated(vstate)
  kind = model_kind(model)
  if model_state is None:
    if vstate.model_state is not None:  # a train step's state holds it
      model_state = vstate.model_state
    else:
      model_state = make_adapter(model, None, None).split(None)[1] if kind == "nnx" else {}
  elif kind == "linen":
    model_state = {k: v for k, v in dict(model_state).items() if k != "params"}
  return encode(vstate.transform, vstate.params, compressed_view(vstate),
                vstate.transform_state, vstate.step, model_state, kind,
                roles=roles_of(vstate.transform))


def encode(transform: Any, params: Any, compressed: Any, transform_state: Any, count: Any,
           model_state: Any, kind: str, *, roles: dict | None = None) -> tuple[dict, dict]:
  """``(manifest, arrays)`` of a compact export, from exactly what it needs: the
  transform, the dense params (selection and description), the compressed params (the
  values stored), the transform state (factors), the step count (the schedules' point),
  the model state and the model kind (``"linen"`` or ``"nnx"``). ``roles``: what each
  leaf is by path, from a trace (``LeafUse.role``), recorded per leaf when given."""
  compressed = _to_pure(compressed)
  dense = dict(_paths.leaf_paths(_to_pure(params)))
  count = int(np.asarray(jax.device_get(count)))
  arrays: dict[str, np.ndarray] = {}
  leaves = []
  for i, (keys, path, leaf) in enumerate(flatten(compressed)):
    c = np.asarray(jax.device_get(leaf))
    template = dense.get(path, leaf)
    selected = bool(transform.select(path, template))
    settings = {}
    if selected:
      specs, settings = describe(transform, path, template, transform_state, count)
      fmt, leaf_arrays = encode_selected(c, specs)
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
    if roles is not None and path in roles:
      leaves[-1]["role"] = roles[path]
  model_state_rows = []
  for j, (keys, _, leaf) in enumerate(flatten(_to_pure(model_state or {}))):
    name = f"s{j}"
    arrays[name] = np.asarray(jax.device_get(leaf))
    model_state_rows.append({"keys": keys, "array": name})
  manifest = {"format": fmt_lib.FORMAT, "version": fmt_lib.VERSION, "kind": kind,
              "step": count, "leaves": leaves, "model_state": model_state_rows}
  return manifest, arrays
