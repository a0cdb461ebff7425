"""What a model's computation does with each param leaf, read from one trace.

``vj.discover(apply_fn, params, *example)`` runs ``jax.make_jaxpr`` once (no FLOPs, no
activation memory) and follows every param leaf through the program: through
``convert_element_type``, ``transpose``, ``reshape``, ``broadcast_in_dim``, ``squeeze``,
``expand_dims``, ``copy`` and into nested ``jit`` / ``custom_jvp`` / ``custom_vjp`` /
``remat`` calls and ``scan`` bodies. A leaf is then

* ``"linear"``: the weight operand of a ``dot_general`` or a convolution, and only
  that; its input axes are the axes the op contracts (for a convolution, the input
  feature axis and the spatial axes), taken from the op's dimension numbers. So Gemma's
  einsum weights named ``w`` and Equinox's ``(out, in)`` ``weight`` are found with their
  real axes, without naming rules;
* ``"stacked"``: a linear map applied one slice per iteration of a ``scan`` (MaxText's
  ``scan_layers``, ``nn.scan``, ``nnx.scan``), or indexed ``w[i]`` (one whole leading
  slice) inside a loop body (``fori_loop``, ``while_loop``): a stack of separate layers,
  each compressed on its own (``stacked=`` of every transform);
* ``"lookup"``: gathered or indexed only (an embedding table);
* ``"tied"``: both gathered and contracted (a tied input / output embedding);
* ``"elementwise"``: used otherwise (a bias, a norm scale).

:class:`Discovery` turns this into the ``where`` / ``in_axes`` arguments every
transform takes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex_core

from vcon_jax import _paths

_IDENTITY = ("convert_element_type", "copy", "copy_p", "reduce_precision",
             "optimization_barrier")
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}


@dataclasses.dataclass(frozen=True)
class _View:
  """A value derived from one param leaf: for each of its axes, the leaf axes it comes
  from (a tuple; empty for a new axis), and the leaf axes consumed by enclosing scans."""

  leaf: int
  axes: tuple[tuple[int, ...], ...]
  stacked: tuple[int, ...] = ()
  indexed: bool = False  # ``w[i]`` inside a loop: a layer if contracted, else a lookup


@dataclasses.dataclass
class LeafUse:
  """What the computation does with one leaf."""

  path: str
  shape: tuple[int, ...]
  kind: str = "unused"
  in_axes: tuple[int, ...] | None = None
  stack_axes: tuple[int, ...] = ()
  ops: set = dataclasses.field(default_factory=set)

  def role(self) -> str:
    """What the leaf is, in words (``vj.summary``'s role column): ``"linear in (0, 1) out
    (2)"``, ``"stack of 4 layers, in (1,)"``, ``"lookup table"``, ``"tied embedding"``,
    ``"elementwise"`` or ``"unused"``."""
    if self.kind in ("linear", "stacked"):
      ins = tuple(self.in_axes or ())
      outs = tuple(a for a in range(len(self.shape))
                   if a not in ins and a not in self.stack_axes)
      io = f"in {ins} out {outs}"
      if self.kind == "linear":
        return f"linear {io}"
      layers = int(np.prod([self.shape[a] for a in self.stack_axes]))
      return f"stack of {layers} layers, {io}"
    return {"lookup": "lookup table", "tied": "tied embedding"}.get(self.kind, self.kind)


def _reshape_axes(old_shape, new_shape, old_axes):
  """Leaf axes of each new axis after a reshape (merges and splits of adjacent axes)."""
  out, i = [], 0
  j = 0
  old, new = list(old_shape), list(new_shape)
  while j < len(new):
    if new[j] == 1 and (i >= len(old) or old[i] != 1):
      out.append(())
      j += 1
      continue
    group, size = [], 1
    while i < len(old) and (size < new[j] or not group):
      group.append(i)
      size *= old[i]
      i += 1
    if size == new[j]:
      out.append(tuple(a for g in group for a in old_axes[g]))
      j += 1
    else:  # one old axis split into several new ones: each part keeps its origin
      parts, prod = [], 1
      while j < len(new) and prod < size:
        parts.append(j)
        prod *= new[j]
        j += 1
      if prod != size:
        return None
      origin = tuple(a for g in group for a in old_axes[g])
      out.extend(origin for _ in parts)
  while i < len(old):  # trailing size-1 axes
    if old[i] != 1:
      return None
    i += 1
  return tuple(out)


class _Tracer:
  def __init__(self, uses: list[LeafUse]):
    self.uses = uses
    self.loops = 0  # depth of the loop bodies (scan, while) being read

  def use(self, view: _View, op: str, **kw):
    u = self.uses[view.leaf]
    if view.indexed and op != "linear":  # a row of a table read in a loop (pos[t])
      u.ops.add("lookup")
      return
    u.ops.add(op)
    if op == "linear":
      u.in_axes = tuple(sorted(set(kw["in_axes"]) | set(u.in_axes or ())))
    if view.stacked:
      u.stack_axes = tuple(sorted(set(u.stack_axes) | set(view.stacked)))

  def run(self, jaxpr, env_in: list):
    env = {}
    for var, view in zip(jaxpr.invars, env_in):
      if view is not None:
        env[var] = view
    read = lambda v: env.get(v) if not isinstance(v, jex_core.Literal) else None  # noqa: E731
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if not any(ins):
        continue
      outs = self.eqn(eqn, ins)
      for var, view in zip(eqn.outvars, outs or ()):
        if view is not None:
          env[var] = view
    return [read(v) for v in jaxpr.outvars]

  def loop(self, body, env_in: list) -> None:
    self.loops += 1
    try:
      self.run(body, env_in)
    finally:
      self.loops -= 1

  def eqn(self, eqn, ins):  # pylint: disable=too-many-return-statements,too-many-branches
    name, p = eqn.primitive.name, eqn.params
    tracked = [(i, v) for i, v in enumerate(ins) if v is not None]
    if name in _IDENTITY:
      return ins[:len(eqn.outvars)]
    if name == "scan":
      sub = p["jaxpr"].jaxpr
      nc, ncarry = p["num_consts"], p["num_carry"]
      inner = list(ins)
      for k in range(nc + ncarry, len(ins)):
        v = ins[k]
        if v is not None:  # consumed one slice per iteration along axis 0
          inner[k] = _View(v.leaf, v.axes[1:], v.stacked + v.axes[0])
      self.loop(sub, inner)
      return None
    if name == "while":  # fori_loop with traced bounds; its body may index a stack
      body = p["body_jaxpr"].jaxpr
      self.loop(body, list(ins[p["cond_nconsts"]:]))
      return None
    if name in _CALLS or "jaxpr" in p or "call_jaxpr" in p:
      sub = p.get(_CALLS.get(name, "jaxpr")) or p.get("call_jaxpr") or p.get("fun_jaxpr")
      sub = getattr(sub, "jaxpr", sub)
      if sub is not None and len(sub.invars) == len(ins):
        return self.run(sub, ins)
      for _, v in tracked:
        self.use(v, name)
      return None
    if len(tracked) != 1:
      for _, v in tracked:
        self.use(v, name)
      return None
    (i, v), = tracked
    if name == "transpose":
      return [dataclasses.replace(v, axes=tuple(v.axes[a] for a in p["permutation"]))]
    if name == "reshape":
      new = _reshape_axes(eqn.invars[0].aval.shape, p["new_sizes"], v.axes)
      if new is None:
        self.use(v, name)
        return None
      return [dataclasses.replace(v, axes=new)]
    if name == "broadcast_in_dim":
      axes = [()] * len(p["shape"])
      for src, dst in enumerate(p["broadcast_dimensions"]):
        axes[dst] = v.axes[src]
      return [dataclasses.replace(v, axes=tuple(axes))]
    if name == "squeeze":
      drop = set(d % len(v.axes) for d in p["dimensions"])
      return [dataclasses.replace(
          v, axes=tuple(a for k, a in enumerate(v.axes) if k not in drop))]
    if name == "expand_dims":
      axes = list(v.axes)
      for d in sorted(p["dimensions"]):
        axes.insert(d, ())
      return [dataclasses.replace(v, axes=tuple(axes))]
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      contract, batch = (lc, lb) if i == 0 else (rc, rb)
      if batch:  # a batched matmul over the weight (e.g. per-head einsum with batch)
        self.use(v, "batched_dot")
        return None
      self.use(v, "linear", in_axes=[a for d in contract for a in v.axes[d]])
      return None
    if name == "conv_general_dilated" and i == 1:
      rhs = p["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
      ins_ = [rhs[1]] + list(rhs[2:])
      self.use(v, "linear", in_axes=[a for d in ins_ for a in v.axes[d]])
      return None
    if name == "dynamic_slice" and i == 0 and self.loops and _one_layer(eqn):
      # inside a loop body, one whole leading slice at a (loop) index: the layer of a
      # stack that fori_loop / while / a scan over a counter runs one per iteration
      return [_View(v.leaf, ((),) + v.axes[1:], v.stacked + v.axes[0], indexed=True)]
    if name in ("gather", "dynamic_slice") and i == 0:
      self.use(v, "lookup")
      return None
    self.use(v, name)
    return None


def _one_layer(eqn) -> bool:
  """Whether a ``dynamic_slice`` takes one index of the leading axis and all of the
  others (``w[i]`` of a stacked weight)."""
  shape, sizes = eqn.invars[0].aval.shape, tuple(eqn.params["slice_sizes"])
  return len(shape) >= 2 and sizes[0] == 1 and sizes[1:] == tuple(shape[1:])


def _classify(u: LeafUse) -> None:
  ops = u.ops
  lin = "linear" in ops
  if not ops:
    u.kind = "unused"
  elif lin and ops <= {"linear"}:
    u.kind = "stacked" if u.stack_axes else "linear"
  elif lin and "lookup" in ops and ops <= {"linear", "lookup"}:
    u.kind = "tied"
  elif ops == {"lookup"}:
    u.kind = "lookup"
  else:
    u.kind = "elementwise"


@dataclasses.dataclass
class Discovery:
  """The uses of every param leaf (:func:`discover`), and the selection they give."""

  leaves: dict[str, LeafUse]

  def paths(self, kind: str) -> list[str]:
    return [p for p, u in self.leaves.items() if u.kind == kind]

  def selection(self, *, skip_stacked: bool = False, where: str | None = None) -> dict:
    """``where=``, ``in_axes=``, ``stacked=`` and ``include_non_kernels=True`` selecting
    exactly the linear maps (not lookup tables, tied embeddings, biases or norms), for
    any transform: ``vj.quantize(4, **found.selection())``. A stack of layers (a weight
    consumed one slice per ``scan`` iteration) is compressed layer by layer; with
    ``skip_stacked=True`` stacks stay dense. ``where``: only the maps whose path matches
    it (``re.search``).

    Raises:
      ValueError: no linear map was found, or a stack's layer axes are not its leading
        axes (a scan over a transposed weight).
    """
    stacked = [] if skip_stacked else self.paths("stacked")
    for p in stacked:
      u = self.leaves[p]
      if u.stack_axes != tuple(range(len(u.stack_axes))):
        raise ValueError(f"{p!r} {u.shape} is a stack over axes {u.stack_axes}, not its "
                         f"leading axes; transpose it so the layer axis comes first.")
    linear = self.paths("linear") + stacked
    if where is not None:
      rx = _paths.compile_pattern("where", where)
      linear = [p for p in linear if rx.search(p)]
      stacked = [p for p in stacked if rx.search(p)]
    if not linear:
      raise ValueError("the trace found no linear map (no dot_general or convolution "
                       "takes a param as its weight)"
                       f"{'' if where is None else f' matching where={where!r}'}.")
    where = "^(" + "|".join(re.escape(p) for p in linear) + ")$"
    in_axes = {f"^{re.escape(p)}$": self.leaves[p].in_axes for p in linear}
    out = {"where": where, "in_axes": in_axes, "include_non_kernels": True}
    if stacked:
      out["stacked"] = {f"^{re.escape(p)}$": len(self.leaves[p].stack_axes)
                        for p in stacked}
    return out

  def table(self) -> str:
    """One line per leaf: path, shape, kind, input axes."""
    rows = [f"{p:40s} {str(u.shape):18s} {u.kind:12s} "
            f"{'' if u.in_axes is None else 'in_axes=' + str(u.in_axes)}"
            f"{' stacked over ' + str(u.stack_axes) if u.stack_axes else ''}"
            for p, u in self.leaves.items()]
    return "\n".join(rows)


def discover(apply_fn: Callable, params: Any, *example: Any) -> Discovery:
  """Traces ``apply_fn(params, *example)`` once and records what it does with each leaf
  of ``params`` (see the module docstring).

  >>> import jax.numpy as jnp, vcon_jax as vj
  >>> params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "table": jnp.ones((10, 3))}
  >>> f = lambda p, i: p["table"][i] @ p["w"] + p["b"]
  >>> found = vj.discover(f, params, jnp.array([1, 2]))
  >>> {p: u.kind for p, u in found.leaves.items()}
  {'b': 'elementwise', 'table': 'lookup', 'w': 'linear'}
  >>> found.leaves["w"].in_axes
  (0,)
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  uses = [LeafUse(_paths.path_str(p), tuple(np.shape(x))) for p, x in flat]
  closed = jax.make_jaxpr(apply_fn)(params, *example)
  n = len(flat)
  views = [_View(k, tuple((a,) for a in range(len(uses[k].shape)))) for k in range(n)]
  rest = len(closed.jaxpr.invars) - n
  _Tracer(uses).run(closed.jaxpr, views + [None] * rest)
  for u in uses:
    _classify(u)
  return Discovery({u.path: u for u in uses})

