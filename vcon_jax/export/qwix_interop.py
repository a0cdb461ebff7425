"""An export as the params of a qwix post-training-quantised (PTQ) model: :func:`to_qwix`.

qwix (``pip install vcon_jax[qwix]``) serves MaxText and Tunix models: a model wrapped by
``qwix.quantize_model(model, qwix.PtqProvider(rules))`` holds each quantised kernel as a
``QArray`` (integer ``qvalue``, a ``scale`` per tile, an optional ``zero_point``) and
dequantises it in front of its matmul. :func:`to_qwix` fills such a model with *our* codes
and scales, so it computes exactly the compressed model we trained.

Decision: our codes and scales are carried, never recomputed. qwix's own PTQ rule sets a
symmetric scale to ``absmax / (qmax + 1/2)`` (int4: ``absmax / 7.5``, levels -8..7) where
ours is ``absmax / L`` with levels ``-L..L`` (int4: ``L = 7``); qwix quantising our weights
again would give other codes. Our levels fit qwix's integer type (int4 holds our int2,
int3 and int4 levels) and each scale is ours, in qwix's scale dtype (the model's: when
that dtype does not hold the stored scale, its neighbour there that gives the same values;
every tile is checked), so qwix's dequantised kernel ``(qvalue - zero_point) * scale`` is
ours bit for bit, and so are the logits. A layer qwix cannot hold exactly is refused with
one line: a scale that the qwix model's scale dtype does not represent (train with
``quantize(..., scale_dtype=...)`` of that dtype), qwix tiles that cut across one of our
scale groups (set the rule's ``tile_size`` to our ``group_size``; tiles finer than our
groups are fine: our scale is repeated), levels outside its integer type, or a kernel that
we store as float values (pruned only) or low-rank (leave it out of the qwix rules: it then
gets our compressed values as a dense kernel). Binary layers carry as levels +-1.

Multi-axis kernels (an einsum's ``(N, D, H)`` q, ``(2, K, D, H)`` fused kv, ``(N, H, D)``
output) keep their own shape: our codes and scales live on the ``(fan_in, fan_out)``
matrix over the leaf's input axes (the trace's ``in_axes``), and are put back in the
kernel's layout before they are matched to qwix's scale, which has one entry per tile of
each axis (for an einsum weight: per entry of the axes it does not contract, tiles of
``tile_size`` along its last contracting axis, one shared over the other contracting
axes). A tile that sees two of our scales is refused naming the axis and both layouts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vcon_jax import _paths
from vcon_jax.export import codec, format as fmt_lib


def _levels(fmt: dict, arr: dict, fan_in: int, fan_out: int) -> tuple[np.ndarray, Any]:
  """The integer levels (``value = (level - zero) * scale``) of a coded int leaf as its
  ``(fan_in, fan_out)`` matrix, and its zero points (None when symmetric), numpy."""
  vals = np.asarray(codec._values(np, fmt, arr)).astype(np.int32)
  zero = np.asarray(arr["zero"]).astype(np.int32) if fmt.get("zero_point") else None
  if fmt["layout"] == "dense":
    return vals.reshape(fan_in, fan_out), zero
  # sparse: every entry not stored is 0, i.e. the level of its zero point
  if zero is None:
    full = np.zeros((fan_in * fan_out,), np.int32)
  else:
    full = np.broadcast_to(codec._dense_per_entry(np, fmt, zero, fan_in),
                           (fan_in, fan_out)).reshape(-1).copy()
  full[codec.sparse_positions(fmt, arr, fan_in, fan_out)] = vals
  return full.reshape(fan_in, fan_out), zero


def _split(a: np.ndarray, tiles: tuple) -> np.ndarray:
  """``a`` with each axis ``i`` split into ``(tiles[i], a.shape[i] // tiles[i])``: the
  even axes index qwix's tiles, the odd ones the entries of a tile."""
  return a.reshape(tuple(d for n, s in zip(a.shape, tiles) for d in (s, n // s)))


def _tile_axes(ndim: int) -> tuple:
  return tuple(range(1, 2 * ndim, 2))


class _Kernel:
  """One stored kernel: its shape, its input axes (the trace's ``in_axes``; ``None``: all
  but the last) and the ``(fan_in, fan_out)`` matrix view its codes and scales use."""

  def __init__(self, name: str, fmt: dict, shape: tuple):
    self.name, self.fmt, self.shape = name, fmt, shape
    self.in_axes = fmt.get("in_axes")
    self.ins = (tuple(range(len(shape) - 1)) if self.in_axes is None
                else tuple(int(a) for a in self.in_axes))
    self.fan_in, self.fan_out = _paths.matricize_shape(shape, self.in_axes)

  def full(self, mat: np.ndarray) -> np.ndarray:
    """A ``(fan_in, fan_out)`` matrix in the kernel's own layout."""
    return np.ascontiguousarray(_paths.from_matrix(mat, self.shape, self.in_axes))

  def runs(self) -> dict:
    """How many consecutive entries along each input axis share one of our scales (a group
    of ``g`` flattened inputs covers the last input axis first)."""
    mode = self.fmt["scale"]
    if mode != "group":
      return {a: self.shape[a] for a in self.ins}
    rem, runs = self.fmt["group_size"], {a: 1 for a in self.ins}
    for a in reversed(self.ins):
      runs[a] = min(rem, self.shape[a])
      rem //= runs[a]
      if rem <= 1:
        break
    return runs

  def ours(self) -> str:
    """Our layout, in words, for a refusal."""
    mode = self.fmt["scale"]
    if mode == "layer":
      per = "one scale for the whole kernel"
    elif mode == "channel":
      per = "a scale per output (over all inputs)"
    else:
      runs = [f"{r} of axis {a}" for a, r in self.runs().items() if r > 1]
      per = (f"a scale per {self.fmt['group_size']} inputs ({' x '.join(runs) or '1'}) of "
             f"each output")
    return f"input axes {self.ins}, {per}"

  def cut(self, what: str, axis: int, tiles: tuple) -> ValueError:
    """The one-line refusal when qwix's ``tiles`` (its scale shape) cut across one of our
    scale groups along ``axis``."""
    n = self.shape[axis]
    words = []
    for a, (na, sa) in enumerate(zip(self.shape, tiles)):
      words.append(f"axis {a} " + ("per entry" if sa == na else "shared" if sa == 1
                                   else f"in tiles of {na // sa}"))
    qwix_layout = f"scale shape {tiles}: {', '.join(words)}"
    tiled = [a for a in range(len(tiles)) if tiles[a] < self.shape[a]]  # not channelwise
    run = self.runs().get(axis)
    if axis not in self.ins:
      fix = (f"axis {axis} is an output axis here but the qwix op contracts it (the "
             f"export's in_axes are not the op's)")
    elif tiled and axis == tiled[-1] and run and n % run == 0:
      fix = f"set the qwix rule's tile_size={run} (qwix tiles only that axis)"
    else:
      fix = (f"qwix tiles only the last contracting axis and shares a {what} over the "
             f"others: quantise {self.name} per channel (no group_size) or leave it out "
             f"of the qwix rules")
    return ValueError(
        f"to_qwix: qwix's {what} tiles of {self.name} {self.shape} cut across our groups "
        f"along axis {axis} (size {n}): ours: {self.ours()}; qwix: {qwix_layout}; {fix}.")


def _per_tile(kernel: _Kernel, what: str, a: np.ndarray, tiles: tuple) -> np.ndarray:
  """Our scales (or zero points) as qwix's ``tiles``-shaped array: each of our values
  repeated over the tiles it covers; refused unless every tile sees one value."""
  k = kernel
  full = k.full(np.broadcast_to(codec._dense_per_entry(np, k.fmt, np.asarray(a), k.fan_in),
                                (k.fan_in, k.fan_out)))
  if len(tiles) != len(k.shape) or any(n % s for n, s in zip(k.shape, tiles)):
    raise ValueError(f"to_qwix: {k.name}'s qwix {what} has shape {tuple(tiles)}, which does "
                     f"not tile its {k.shape} kernel.")
  t = _split(full, tiles)
  first = t[tuple(slice(0, 1) if i % 2 else slice(None) for i in range(t.ndim))]
  if not np.array_equal(t, np.broadcast_to(first, t.shape)):
    # the first axis along which a tile sees two values (there is one: a tile constant
    # along each of its axes is constant)
    axis = next(a for a in range(len(tiles)) if not np.array_equal(
        t, np.broadcast_to(np.take(t, [0], axis=2 * a + 1), t.shape)))
    raise k.cut(what, axis, tuple(tiles))
  return np.ascontiguousarray(first.reshape(tiles))


def _qarray(name: str, leaf: dict, arr: dict, template: Any, target: np.ndarray) -> Any:
  """Our stored leaf as a QArray shaped and typed like qwix's ``template`` QArray, whose
  dequantised value is ``target`` (our decoded kernel) bit for bit.

  The kernel keeps its own shape (a Dense ``(in, out)`` kernel, an einsum's ``(N, D, H)``
  or ``(2, K, D, H)``): our codes are put back from their ``(fan_in, fan_out)`` matrix
  over the leaf's input axes, and our scales repeated over every qwix tile they cover."""
  import qwix

  fmt = leaf["format"]
  if fmt["kind"] != "coded" or fmt["codec"] not in ("int", "binary"):
    what = ("low-rank factors" if fmt["kind"] == "low_rank" else
            "float values (pruned only)" if fmt.get("codec") == "float" else "a dense array")
    raise ValueError(f"to_qwix: the qwix model quantises {name}, which this export holds "
                     f"as {what}, not integer codes; leave it out of the qwix rules "
                     f"(module_path) so it runs dense with our values.")
  shape = tuple(leaf["shape"])
  if tuple(template.shape) != shape:
    raise ValueError(f"to_qwix: {name} is a {shape} kernel in the export but the qwix model "
                     f"quantises it as {tuple(template.shape)} (reshaped before its op); "
                     f"only kernels quantised in their own shape are carried.")
  kernel = _Kernel(name, fmt, shape)
  levels, zero = _levels(fmt, arr, kernel.fan_in, kernel.fan_out)
  scale32 = _per_tile(kernel, "scale", np.asarray(arr["scale"]).astype(np.float32),
                      tuple(template.scale.shape))
  sdtype = np.dtype(template.scale.dtype)
  qtype = template.qvalue.dtype
  info = jnp.iinfo(qtype)
  shift = 0
  if zero is not None:
    if template.zero_point is None:
      raise ValueError(f"to_qwix: {name} has zero points (symmetric=False) but the qwix "
                       f"model is symmetric; use an asymmetric qwix rule "
                       f"(weight_calibration_method='minmax').")
    # ours: unsigned codes 0 .. 2**bits - 1 with zero points; qwix: signed codes
    shift = 2 ** (fmt["bits"] - 1)
    zero = _per_tile(kernel, "zero point", zero, tuple(template.zero_point.shape)) - shift
  elif template.zero_point is not None:
    zero = np.zeros(template.zero_point.shape, np.int32)
  q = kernel.full(levels) - shift
  lo, hi = int(q.min(initial=0)), int(q.max(initial=0))
  if zero is not None:
    lo, hi = min(lo, int(zero.min(initial=0))), max(hi, int(zero.max(initial=0)))
  if lo < info.min or hi > info.max:
    raise ValueError(f"to_qwix: the {fmt['bits']}-bit codes of {name} span {lo}..{hi}, "
                     f"outside the qwix model's {jnp.dtype(qtype).name} "
                     f"({info.min}..{info.max}); use a qwix weight_qtype that holds them.")
  zp = None if zero is None else jnp.asarray(zero.astype(np.int32)).astype(
      template.zero_point.dtype)
  qvalue = jnp.asarray(q).astype(qtype)

  def qarray(scale):
    return qwix.QArray(qvalue=qvalue, scale=jnp.asarray(scale), zero_point=zp,
                       qtype=template.qtype)

  # the scale in qwix's scale dtype: ours when that dtype holds it, else per tile the
  # neighbour in that dtype that gives every value of the tile bit for bit
  scale = _carried_scale(name, qarray, scale32, sdtype, target, template)
  return qarray(scale)


def _carried_scale(name, qarray, scale32, sdtype, target, template):
  """Per tile, a scale of dtype ``sdtype`` with which qwix's dequantisation gives exactly
  ``target`` (our decoded kernel, in its own shape), tried in order: ours rounded to
  ``sdtype``, then its two neighbours in that dtype (the export stores the smallest scale
  that decodes to our values in the model's dtype, which a narrower scale dtype may not
  hold)."""
  import qwix

  tiles = tuple(template.scale.shape)
  want = _split(_bits(target), tiles)
  base = np.asarray(jnp.asarray(scale32).astype(sdtype))
  ubits = np.uint16 if sdtype.itemsize == 2 else np.uint32
  step = base.view(ubits)
  candidates = [base, (step + 1).view(sdtype), (step - 1).view(sdtype)]
  chosen, done = base.copy(), np.zeros(tiles, bool)
  for cand in candidates:
    got = np.asarray(qwix.dequantize(qarray(cand)).astype(target.dtype))
    ok = (_split(_bits(got), tiles) == want).all(axis=_tile_axes(len(tiles))) & ~done
    chosen[ok], done = cand[ok], done | ok
  if not done.all():
    raise ValueError(f"to_qwix: no {sdtype.name} scale gives the compressed values of {name} "
                     f"in {int((~done).sum())} of its {done.size} qwix tiles; train with "
                     f"quantize(..., scale_dtype=jnp.{sdtype.name}) or serve a qwix model "
                     f"whose scales are float32.")
  return chosen


def _bits(a) -> np.ndarray:
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def to_qwix(compact: Any, qwix_model: Any, x: Any = None) -> Any:
  """Our export as the weights of a qwix PTQ model, bit for bit.

  Args:
    compact: a :class:`~vcon_jax.CompressedModel` (from :func:`~vcon_jax.load_compressed`).
    qwix_model: the model wrapped by ``qwix.quantize_model(model, qwix.PtqProvider(rules))``
      with weight-only rules (``act_qtype=None``): a Linen module, or an NNX module (then
      filled in place, statistics included).
    x: a Linen model's example input (its params are found by ``jax.eval_shape`` of
      ``init``; nothing is computed). Not used for NNX.

  Returns:
    Linen: the variables for ``qwix_model.apply(variables, x)``. NNX: ``qwix_model``, now
    holding our codes and scales (and BatchNorm statistics), ready to call.

  >>> qm = qwix.quantize_model(model, qwix.PtqProvider(rules))    # doctest: +SKIP
  >>> variables = vj.to_qwix(vj.load_compressed("m.npz"), qm, x)  # doctest: +SKIP
  >>> logits = qm.apply(variables, x)                             # doctest: +SKIP
  """
  try:
    import qwix
  except ImportError as e:  # pragma: no cover - the extra is installed in the tests
    raise ImportError("to_qwix needs qwix: pip install 'vcon_jax[qwix]'.") from e
  from flax import nnx
  from qwix._src.providers.ptq import WithAux  # the PTQ params' leaf type (no public name)

  stored = {tuple(leaf["keys"]): leaf for leaf in compact._leaves}
  dense = {tuple(leaf["keys"]): compact._dense_leaf(i) for i, leaf in enumerate(compact._leaves)}

  def value(keys, template_q):
    name = "/".join(map(str, keys))
    leaf = stored.get(keys)
    if leaf is None:
      raise ValueError(f"to_qwix: the qwix model has a param {name} that the export lacks.")
    if template_q is None:
      return dense[keys]
    return _qarray(name, leaf, compact._stored(leaf), template_q, np.asarray(dense[keys]))

  if isinstance(qwix_model, nnx.Module):
    graph = nnx.to_pure_dict(nnx.state(qwix_model, nnx.Param))
    flat = traverse_util.flatten_dict(  # a quantised kernel's {"array": ...} is one leaf
        graph, is_leaf=lambda _, v: isinstance(v, dict) and "array" in v)
    ckpt = []
    for keys, leaf in flat.items():
      if isinstance(leaf, dict):  # a quantised kernel: {"array": {"qvalue", "scale", ...}}
        q = value(keys, _abstract_qarray(qwix_model, keys))
        entry = {"qvalue": q.qvalue, "scale": q.scale}
        if q.zero_point is not None:
          entry["zero_point"] = q.zero_point
        ckpt.append(((*keys, "array"), entry))  # the path of the WithAux's QArray
      else:
        ckpt.append((keys, value(keys, None)))
    _check_all_used(stored, set(flat))
    processed = qwix.process_prequantized_params(fmt_lib.unflatten(ckpt), qwix_model)
    nnx.update(qwix_model, processed)
    rest = nnx.to_pure_dict(nnx.state(qwix_model, nnx.Not(nnx.Param)))
    if rest:  # BatchNorm statistics and the like: the exported ones
      nnx.update(qwix_model, compact._merged_state(rest))
    return qwix_model

  if x is None:
    raise ValueError("to_qwix: a Linen qwix model needs an example input: to_qwix(compact, "
                     "qwix_model, x) (its params' shapes come from jax.eval_shape of init).")
  abstract = jax.eval_shape(qwix_model.init, jax.random.key(0), x)
  out = []
  for keys, leaf in traverse_util.flatten_dict(abstract["params"]).items():
    if isinstance(leaf, WithAux):
      out.append((keys, leaf.replace(array=value(keys, leaf.array))))
    else:
      out.append((keys, value(keys, None)))
  _check_all_used(stored, {k for k, _ in out})
  return {"params": fmt_lib.unflatten(out), **compact.model_state()}


def _abstract_qarray(module: Any, keys: tuple) -> Any:
  """The QArray (shapes and dtypes) that an NNX qwix module holds at ``keys``."""
  node = module
  for k in keys:
    node = node[k] if isinstance(k, int) or not hasattr(node, str(k)) else getattr(node, k)
  return node.array


def _check_all_used(stored: dict, used: set) -> None:
  missing = sorted("/".join(map(str, k)) for k in set(stored) - used)
  if missing:
    raise ValueError(f"to_qwix: the export has params the qwix model lacks: "
                     f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; is it "
                     f"the same architecture?")
