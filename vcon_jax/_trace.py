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
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex_core

from vcon_jax import _paths
from vcon_jax._selection import Selection, Traced

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
    self.consumed: set[int] = set()  # linear maps whose result a contraction reads
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

  def run(self, jaxpr, env_in: list, tags_in: list | None = None):
    """Reads ``jaxpr``; returns the views and the output tags of its outputs. A tag is
    the set of linear maps whose result a value is, through elementwise and layout ops
    only (a bias, a softcap, a reshape): the model's output layer is the tag of its
    output."""
    env, tags = {}, {}
    for var, view in zip(jaxpr.invars, env_in):
      if view is not None:
        env[var] = view
    for var, tag in zip(jaxpr.invars, tags_in or ()):
      if tag:
        tags[var] = tag
    lit = lambda v: isinstance(v, jex_core.Literal)  # noqa: E731
    read = lambda v: env.get(v) if not lit(v) else None  # noqa: E731
    tag_of = lambda v: tags.get(v) if not lit(v) else None  # noqa: E731
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      tin = [tag_of(v) for v in eqn.invars]
      if not any(ins) and not any(tin):
        continue
      name = eqn.primitive.name
      sub = _sub_jaxpr(eqn)
      if name in _CONTRACTIONS:  # a layer's result read by a contraction is not an output
        self.consumed.update(*(t for t in tin if t))
      if sub is not None and len(sub.invars) == len(ins) and name != "scan":
        outs, touts = self.run(sub, ins, tin)
      elif name == "cond":  # every branch reads the operands (after the branch index)
        outs, touts = self.branches(eqn, ins[1:], tin[1:])
      else:
        outs = self.eqn(eqn, ins) if any(ins) else None
        touts = [_out_tag(eqn, ins, tin)] * len(eqn.outvars)
      for var, view in zip(eqn.outvars, outs or ()):
        if view is not None:
          env[var] = view
      for var, tag in zip(eqn.outvars, touts or ()):
        if tag:
          tags[var] = tag
    return [read(v) for v in jaxpr.outvars], [tag_of(v) for v in jaxpr.outvars]

  def branches(self, eqn, ins: list, tin: list):
    """A ``cond``: each branch read as a call; a view or tag survives where all agree."""
    results = [self.run(getattr(b, "jaxpr", b), ins, tin) for b in eqn.params["branches"]]
    outs = [v[0] if all(r == v[0] for r in v) else None
            for v in zip(*(views for views, _ in results))]
    touts = [frozenset().union(*(t for t in ts if t)) or None
             for ts in zip(*(tags for _, tags in results))]
    return outs, touts

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
      nc, ncarry = scan_split(p)
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
        return self.run(sub, ins)[0]
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


#: Ops through which a linear map's result is still that map's output (the model's
#: output layer is found through them): elementwise math and layout changes.
_PASS = frozenset(_IDENTITY + (
    "add", "sub", "mul", "div", "neg", "tanh", "logistic", "max", "min", "select_n",
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "integer_pow",
    "clamp", "sign", "abs", "add_any", "exp", "log", "log1p", "expm1", "exp2"))
_CONTRACTIONS = ("dot_general", "conv_general_dilated")
#: Uses of a leaf that leave it what it is (a bias added, a scale multiplied, a 2-D
#: attention bias or a position table added): such a leaf is not a weight the trace
#: failed to read. Any other use of a 2-D-or-more float leaf that is not a linear map
#: (a reduction over it, a batched matmul over it) is reported by ``Discovery.unread``.
BENIGN = frozenset({"add", "sub", "mul", "div", "max", "min", "select_n", "neg", "add_any",
                    "lookup", "integer_pow"})


def _sub_jaxpr(eqn):
  """The jaxpr a call-like equation runs on its operands as they are, else ``None``."""
  name, p = eqn.primitive.name, eqn.params
  if name in ("scan", "while", "cond"):
    return None
  if name in _CALLS or "jaxpr" in p or "call_jaxpr" in p:
    sub = p.get(_CALLS.get(name, "jaxpr")) or p.get("call_jaxpr") or p.get("fun_jaxpr")
    return getattr(sub, "jaxpr", sub)
  return None


def _out_tag(eqn, ins, tin) -> frozenset | None:
  name = eqn.primitive.name
  if name in ("dot_general", "conv_general_dilated"):
    weight = 1 if name == "conv_general_dilated" else None
    tracked = [(i, v) for i, v in enumerate(ins) if v is not None]
    if len(tracked) == 1 and weight in (None, tracked[0][0]):
      i, v = tracked[0]
      if name == "dot_general" and eqn.params["dimension_numbers"][1][i]:
        return None  # batched over the weight: not one linear map
      return frozenset((v.leaf,))
    return None
  if name in _PASS:
    out = frozenset().union(*(t for t in tin if t))
    return out or None
  return None


def scan_split(params: dict) -> tuple[int, int]:
  """``(constants, carries)`` at the front of a ``scan``'s operands (the rest are the
  scanned ``xs``), on every supported JAX: ``num_consts`` / ``num_carry`` up to 0.10,
  the three groups of ``ft_in`` (constants, carry, xs) from 0.11 on. The one place that
  reads these version-dependent params; anything else is refused, not guessed."""
  if "num_consts" in params:
    return int(params["num_consts"]), int(params["num_carry"])
  groups = params.get("ft_in")
  try:  # a FlatTree of (consts, carry, xs), one value per operand
    consts, carry, _ = groups.unpack()
    return len(list(consts.vals)), len(list(carry.vals))
  except (AttributeError, TypeError, ValueError):
    pass
  raise NotImplementedError(
      f"this JAX ({jax.__version__}) describes a scan's operands by "
      f"{sorted(k for k in params if k != 'jaxpr')}, which vcon_jax does not read yet; "
      f"declare the scanned weights with vj.Selection(in_axes=..., stacked=...), or use "
      f"JAX 0.10 to 0.12.")


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
  """The uses of every param leaf (:func:`discover`), and the selection they give.

  Attributes:
    leaves: ``{path: LeafUse}`` for every leaf.
    outputs: the paths of the output layer: the linear maps whose result is the model's
      output (through elementwise ops only: a bias, a softcap). They stay dense by
      default (``vj.Selection(outputs=regex)`` opts in).
  """

  leaves: dict[str, LeafUse]
  outputs: tuple[str, ...] = ()
  #: the arguments of ``vj.find_units(*source)`` on the traced model (``prune_units``
  #: takes its unit groups from it when no ``units=`` are given)
  source: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

  def paths(self, kind: str) -> list[str]:
    return [p for p, u in self.leaves.items() if u.kind == kind]

  def unread(self) -> dict[str, tuple[str, ...]]:
    """``{path: ops}`` of the leaves of 2 or more axes the model uses in ways that are
    neither a linear map nor a plain elementwise use (:data:`BENIGN`): a reduction over a
    weight (weight standardisation), a matmul batched over it (MoE experts). Selection
    refuses them rather than leave them dense without a word."""
    return {p: tuple(sorted(u.ops)) for p, u in self.leaves.items()
            if len(u.shape) >= 2 and u.kind == "elementwise" and not u.ops <= BENIGN}

  def linear_maps(self) -> dict:
    """``{path: Traced(in_axes, stack)}`` of every linear map (stacks included).

    Raises:
      ValueError: a stack's layer axes are not its leading axes (a scan over a
        transposed weight).
    """
    out = {}
    for p, u in self.leaves.items():
      if u.kind == "stacked" and u.stack_axes != tuple(range(len(u.stack_axes))):
        raise ValueError(f"{p!r} {u.shape} is a stack over axes {u.stack_axes}, not its "
                         f"leading axes; transpose it so the layer axis comes first.")
      if u.kind in ("linear", "stacked"):
        out[p] = Traced(tuple(u.in_axes), len(u.stack_axes))
    return out

  def selection(self, *, skip_stacked: bool = False, where: str | None = None,
                outputs: str | None = None) -> Any:
    """The :class:`vcon_jax.Selection` of exactly the linear maps (not lookup tables,
    tied embeddings, biases, norms or the output layer), for any transform:
    ``vj.quantize(4, selection=found.selection())``. A stack of layers is compressed
    layer by layer; with ``skip_stacked=True`` stacks stay dense. ``where``: only the
    maps whose path matches it (``re.search``); ``outputs``: output layers to compress
    anyway.

    Raises:
      ValueError: no linear map was found, or a stack's layer axes are not its leading
        axes.
    """
    sel = Selection(where=where, outputs=outputs).traced(self)
    if skip_stacked:
      sel = sel.replace(leaves={p: t for p, t in sel.leaves.items() if not t.stack})
    rx = _paths.compile_pattern("where", where)
    if not [p for p in sel.leaves if rx is None or rx.search(p)]:
      raise ValueError("the trace found no linear map (no dot_general or convolution "
                       "takes a param as its weight)"
                       f"{'' if where is None else f' matching where={where!r}'}.")
    return sel

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
  tracer = _Tracer(uses)
  _, out_tags = tracer.run(closed.jaxpr, views + [None] * rest)
  for u in uses:
    _classify(u)
  # the output layer: a linear map whose result reaches an output and no contraction
  # (a residual stream returned as hidden_states, a returned k/v cache are read by one)
  last = sorted(set().union(*(t for t in out_tags if t)) - tracer.consumed)
  outputs = tuple(uses[k].path for k in last if uses[k].kind == "linear")
  return Discovery({u.path: u for u in uses}, outputs, (apply_fn, params) + example)

