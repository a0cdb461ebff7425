"""Which param slices form one removable unit, read from the model's data flow.

``unit_groups(apply_fn, variables, *example)`` traces ``apply_fn`` once
(``jax.make_jaxpr``: no FLOPs) and gives every axis of every value a *tag*: the group of
param slices its entries come from. A linear map's output axis starts a group (the
weight's output axis is its *producer*); elementwise operations carry the tag and couple
what they combine (a bias, a norm scale, BatchNorm statistics, the gate and up halves of a
gated MLP); a ``dot_general`` / convolution that contracts a tagged axis with a weight
couples that weight's input axis (its *consumer*); reshapes that split or merge a tagged
axis turn units into blocks (a head of ``head_dim`` columns), and with grouped-query
attention a key / value head and its query group become one unit.

A group is *removable* when its units never mix: a reduction over the unit axis (a norm
over the width), a slice, a gather, a model output or an operation we do not know breaks
the group, as does an elementwise combination with data that is not constant along the
unit axis. So the residual width (normalised, and read by the embedding lookup) is not a
group; an MLP's hidden units, a convolution's channels (through BatchNorm) and attention
heads are, when the model has a consumer for them. Only removable groups with a producer
and a consumer are returned: removing one of their units (zeroing its slice in every
member) changes nothing but what that unit carried.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex_core

from vcon_jax import _paths

_UNARY = {"neg", "abs", "sign", "exp", "exp2", "log", "log1p", "expm1", "tanh",
          "logistic", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "sin", "cos",
          "tan", "integer_pow", "square", "floor", "ceil", "round", "is_finite", "not",
          "convert_element_type", "copy", "copy_p", "reduce_precision", "real", "imag",
          "stop_gradient", "asinh", "acosh", "atanh", "sinh", "cosh", "asin", "acos",
          "atan", "lgamma", "digamma", "population_count", "clz"}
_NARY = {"add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2",
         "nextafter", "and", "or", "xor", "eq", "ne", "lt", "le", "gt", "ge",
         "select_n", "clamp", "shift_left", "shift_right_logical",
         "shift_right_arithmetic"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
           "reduce_or", "reduce_xor", "argmax", "argmin"}
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
BCAST = "bcast"  # an axis along which the value is constant (a broadcast)


@dataclasses.dataclass(frozen=True, order=True)
class Member:
  """One leaf's share of a unit group: along ``axis``, unit ``u`` is the entries
  ``r * units * block + u * block + j`` for ``j < block`` and ``r < repeat`` (``repeat``
  > 1 where the unit axis was flattened innermost: a dense layer reading
  ``(h, w, channels)`` features flattened)."""

  path: str
  axis: int
  block: int
  repeat: int = 1

  def entries(self, kept, units: int):
    """The indices along ``axis`` of the units ``kept`` (an int array), in order."""
    kept = np.asarray(kept)
    idx = (np.arange(self.repeat)[:, None, None] * units * self.block
           + kept[None, :, None] * self.block + np.arange(self.block)[None, None, :])
    return idx.reshape(-1)


@dataclasses.dataclass(frozen=True)
class UnitGroup:
  """A set of param slices that go together: ``units`` units, each spanning ``block``
  entries of ``axis`` in every member leaf."""

  units: int
  members: tuple[Member, ...]

  def describe(self) -> str:
    parts = ", ".join(f"{m.path}[axis {m.axis}{'' if m.block == 1 else f' x{m.block}'}"
                      f"{'' if m.repeat == 1 else f' every {self.units * m.block}'}]"
                      for m in self.members)
    return f"{self.units} units: {parts}"


class _Groups:
  """Union-find over groups; a group holds (leaf, axis, block, repeat) nodes."""

  def __init__(self):
    self.parent: list[int] = []
    self.units: list[int] = []
    self.nodes: list[set] = []
    self.broken: list[bool] = []
    self.coarse: dict = {}
    self.finer: dict[int, int] = {}  # coarse group -> the group it was made from

  def new(self, units: int, nodes=()) -> int:
    self.parent.append(len(self.parent))
    self.units.append(units)
    self.nodes.append(set(nodes))
    self.broken.append(False)
    return len(self.parent) - 1

  def find(self, g: int) -> int:
    while self.parent[g] != g:
      self.parent[g] = self.parent[self.parent[g]]
      g = self.parent[g]
    return g

  def union(self, a: int, b: int) -> int:
    a, b = self.find(a), self.find(b)
    if a == b:
      return a
    if self.units[a] != self.units[b]:  # callers coarsen first; be safe
      self.break_(a)
      self.break_(b)
      return a
    self.parent[b] = a
    self.nodes[a] |= self.nodes[b]
    self.broken[a] = self.broken[a] or self.broken[b]
    return a

  def break_(self, g: int) -> None:
    self.broken[self.find(g)] = True

  def closure(self, ids) -> set[int]:
    """The roots of ``ids`` and of every group coarsened from one of them."""
    roots = {self.find(g) for g in ids}
    while True:
      more = {self.find(c) for c, f in self.finer.items() if self.find(f) in roots} - roots
      if not more:
        return roots
      roots |= more

  def coarsen(self, g: int, factor: int, repeat: int = 1) -> int:
    """The group whose unit is ``factor`` consecutive units of ``g``, repeated
    ``repeat`` times along the axis (``g`` is then coupled coarsely, so it is no longer
    removable one unit at a time)."""
    g = self.find(g)
    key = (g, factor, repeat)
    if key not in self.coarse:
      nodes = {(leaf, axis, block * factor, rep * repeat)
               for leaf, axis, block, rep in self.nodes[g]}
      self.coarse[key] = self.new(self.units[g] // (factor * repeat), nodes)
      self.finer[self.coarse[key]] = g
      if self.broken[g]:
        self.break_(self.coarse[key])
    self.break_(g)
    return self.coarse[key]


@dataclasses.dataclass(frozen=True)
class _Tag:
  group: int
  span: int  # consecutive entries of the value's axis per unit
  repeat: int = 1  # the units' pattern repeats this many times along the axis

  def units(self, size: int) -> int:
    return size // (self.span * self.repeat)


class _Flow:
  """Runs a jaxpr with, for each value, one entry per axis: a ``_Tag``, ``BCAST`` or
  ``None`` (data that varies along the axis)."""

  def __init__(self, groups: _Groups):
    self.g = groups
    self.produced: set[int] = set()   # groups started by a weight's output axis
    self.consumed: set[int] = set()   # groups a weight's input axis reads
    self.joint: list[list[int]] = []  # groups one weight contracts together, outer first

  # -- tags --
  def merge(self, tags: list, size: int):
    """The tag of one axis where values with ``tags`` meet elementwise."""
    real = [t for t in tags if isinstance(t, _Tag)]
    if not real:
      return BCAST if all(t == BCAST for t in tags) else None
    if any(t is None for t in tags):  # data that varies along a unit axis: not removable
      for t in real:
        self.g.break_(t.group)
      return None
    out = real[0]
    for t in real[1:]:
      out = self.join(out, t, size)
    return out

  def join(self, a: _Tag, b: _Tag, size: int) -> _Tag:
    na, nb = a.units(size), b.units(size)
    if na == nb and a.span == b.span and a.repeat == b.repeat:
      return _Tag(self.g.union(a.group, b.group), a.span, a.repeat)
    fine, coarse = (a, b) if na > nb else (b, a)
    # the coarse unit in units of the fine axis: `factor` consecutive fine units, the
    # pattern repeated `repeat` times (possible when the fine tag does not repeat, or
    # repeats as the coarse one does)
    repeat = 1 if fine.repeat == coarse.repeat else coarse.repeat
    if (na == nb or coarse.span % fine.span or (fine.repeat != 1 and repeat != 1)
        or fine.units(size) != coarse.units(size) * (coarse.span // fine.span) * repeat):
      self.g.break_(a.group)
      self.g.break_(b.group)
      return coarse
    c = self.g.coarsen(fine.group, coarse.span // fine.span, repeat)
    return _Tag(self.g.union(coarse.group, c), coarse.span, coarse.repeat)

  def break_all(self, views):
    for v in views:
      for t in v or ():
        if isinstance(t, _Tag):
          self.g.break_(t.group)

  # -- the interpreter --
  def run(self, jaxpr, ins: list, data: list):
    """``ins``: the view of each input; ``data``: whether it depends on the model's
    input (a weight does not). Returns the outputs' views and data flags."""
    env, dep = {}, set()
    def read(v):
      if isinstance(v, jex_core.Literal):
        return (BCAST,) * len(np.shape(v.val))
      return env.get(v, (None,) * len(v.aval.shape))
    is_data = lambda v: not isinstance(v, jex_core.Literal) and v in dep  # noqa: E731
    for var, view, d in zip(jaxpr.invars, ins, data):
      if view is not None:
        env[var] = view
      if d:
        dep.add(var)
    for eqn in jaxpr.eqns:
      views = [read(v) for v in eqn.invars]
      flags = [is_data(v) for v in eqn.invars]
      outs, out_flags = self.eqn(eqn, views, flags)
      for var, view, d in zip(eqn.outvars, outs, out_flags):
        env[var] = view
        if d:
          dep.add(var)
    return [read(v) for v in jaxpr.outvars], [is_data(v) for v in jaxpr.outvars]

  def eqn(self, eqn, views, flags):
    """The outputs' views and data flags of one equation."""
    p = eqn.params
    if eqn.primitive.name not in ("scan", "while", "cond") and any(k in p for k in _CALLS):
      sub = next(p[k] for k in _CALLS if k in p)
      sub = getattr(sub, "jaxpr", sub)
      if len(sub.invars) == len(views):
        return self.run(sub, views, flags)
    return self.op(eqn, views, flags), [any(flags)] * len(eqn.outvars)

  def op(self, eqn, views, flags):  # pylint: disable=too-many-return-statements,too-many-branches
    name, p = eqn.primitive.name, eqn.params
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    outs_shape = [tuple(v.aval.shape) for v in eqn.outvars]
    none = lambda s: (None,) * len(s)  # noqa: E731
    if name == "optimization_barrier":
      return views
    if name in _UNARY:
      return [views[0]]
    if name in _NARY:
      shape = outs_shape[0]
      full = [v for v, s in zip(views, shapes) if len(s) == len(shape)]
      return [tuple(self.merge([v[d] for v in full], shape[d]) if shape[d] > 1 else BCAST
                    for d in range(len(shape)))]
    if name in _REDUCE:
      axes = set(p["axes"])
      v = views[0]
      for d in axes:
        if isinstance(v[d], _Tag):
          self.g.break_(v[d].group)
      return [tuple(t for d, t in enumerate(v) if d not in axes)]
    if name == "transpose":
      return [tuple(views[0][a] for a in p["permutation"])]
    if name == "broadcast_in_dim":
      shape, v, src_shape = p["shape"], views[0], shapes[0]
      out = [BCAST] * len(shape)
      for src, dst in enumerate(p["broadcast_dimensions"]):
        out[dst] = BCAST if src_shape[src] == 1 and shape[dst] != 1 else v[src]
      return [tuple(out)]
    if name == "squeeze":
      drop = {d % len(views[0]) for d in p["dimensions"]}
      return [tuple(t for d, t in enumerate(views[0]) if d not in drop)]
    if name == "expand_dims":
      out = list(views[0])
      for d in sorted(p["dimensions"]):
        out.insert(d, BCAST)
      return [tuple(out)]
    if name == "reshape":
      return [self.reshape(views[0], shapes[0], tuple(p["new_sizes"]))]
    if name == "dot_general":
      return [self.dot(eqn, views, shapes, flags)]
    if name == "conv_general_dilated":
      return [self.conv(eqn, views, shapes, flags)]
    if name in ("slice", "dynamic_slice", "rev", "pad", "split", "concatenate", "cumsum",
                "cumprod", "cummax", "cummin", "cumlogsumexp", "reduce_window_max",
                "reduce_window_min", "reduce_window_sum"):
      return self.along(name, p, views, shapes, outs_shape)
    # anything else (gather, slices, concatenation, scan, cumulative ops): units mix
    self.break_all(views)
    return [none(s) for s in outs_shape]

  def reshape(self, v, old, new):
    groups = _axis_groups(old, new)
    if groups is None:
      self.break_all([v])
      return (None,) * len(new)
    out = [BCAST] * len(new)
    for olds, news in groups:
      tags = [v[a] for a in olds]
      if not news or not olds:  # a size-1 axis dropped or added
        continue
      if len(olds) == 1 and len(news) >= 1:  # one old axis into one or more new ones
        t = tags[0]
        if not isinstance(t, _Tag):
          for n in news:
            out[n] = t if new[n] != 1 else BCAST
          continue
        inner = math.prod(new[n] for n in news[1:])
        for n in news[1:]:
          out[n] = None
        if t.repeat != 1:  # a repeated unit pattern split again: not followed
          self.g.break_(t.group)
          out[news[0]] = None
        elif t.span % inner == 0:
          out[news[0]] = _Tag(t.group, t.span // inner)
        elif inner % t.span == 0 and (old[olds[0]] // t.span) % (inner // t.span) == 0:
          factor = inner // t.span
          out[news[0]] = _Tag(self.g.coarsen(t.group, factor), 1)
        else:
          self.g.break_(t.group)
          out[news[0]] = None
        continue
      # several old axes into one new axis: at most one of them a unit axis; the axes
      # after it make each unit a block, the axes before it repeat the pattern
      (n,) = news
      where = [k for k, t in enumerate(tags) if isinstance(t, _Tag)]
      if len(where) > 1:
        self.break_all([tags])
        out[n] = None
      elif where:
        (k,) = where
        t = tags[k]
        out[n] = _Tag(t.group, t.span * math.prod(old[a] for a in olds[k + 1:]),
                      t.repeat * math.prod(old[a] for a in olds[:k]))
      else:
        out[n] = BCAST if all(t == BCAST for t in tags) else None
    return tuple(out)

  def along(self, name, p, views, shapes, outs_shape):
    """Slicing, padding, reversing, splitting, concatenating or scanning along some axes:
    units on those axes mix or go, units on the others stay."""
    rank = len(shapes[0])
    if name in ("slice", "dynamic_slice", "pad"):
      new, old = outs_shape[0], shapes[0]
      axes = {d for d in range(rank) if new[d] != old[d]}
    elif name == "rev":
      axes = set(p["dimensions"])
    elif name.startswith("reduce_window"):  # pooling: the windowed axes mix, channels not
      axes = {d for d in range(rank) if p["window_dimensions"][d] != 1
              or p["window_strides"][d] != 1 or tuple(p["padding"][d]) != (0, 0)
              or p["base_dilation"][d] != 1 or p["window_dilation"][d] != 1}
    elif name in ("split", "concatenate"):
      axes = {p.get("axis", p.get("dimension"))}
    else:
      axes = {p["axis"]}
    tracked = views if name == "concatenate" else views[:1]
    self.break_all([[v[d] for d in axes] for v in tracked])
    keep = tuple(None if d in axes else
                 self.merge([v[d] for v in tracked], shapes[0][d]) if len(tracked) > 1
                 else tracked[0][d] for d in range(rank))
    return [keep for _ in outs_shape]

  def dot(self, eqn, views, shapes, flags):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lv, rv = views
    ls, rs = shapes
    out = [self.merge([lv[a], rv[b]], ls[a]) for a, b in zip(lb, rb)]
    weight = 1 if flags[0] and not flags[1] else 0 if flags[1] and not flags[0] else None
    joint = []
    for a, b in zip(lc, rc):  # contracted: the two sides' units are the same units
      t = self.contract(lv[a], rv[b], ls[a])
      if t is not None and weight is not None:
        self.consumed.add(t.group)
        joint.append((b if weight == 1 else a, t.group))
    if len(joint) > 1:
      self.joint.append([g for _, g in sorted(joint)])
    free_l = [lv[d] for d in range(len(ls)) if d not in lc and d not in lb]
    free_r = [rv[d] for d in range(len(rs)) if d not in rc and d not in rb]
    if weight is not None:
      for t in (free_r if weight == 1 else free_l):
        if isinstance(t, _Tag):
          self.produced.add(t.group)
    return tuple(out + free_l + free_r)

  def contract(self, a, b, size):
    """Axes ``a`` and ``b`` summed over together: a removed unit must go from both.
    Returns the joined tag (``None`` when not both are units)."""
    if isinstance(a, _Tag) and isinstance(b, _Tag):
      return self.join(a, b, size)
    if isinstance(a, _Tag) or isinstance(b, _Tag):  # one side is data: it stays whole
      self.break_all([(a, b)])
    return None

  def conv(self, eqn, views, shapes, flags):
    dn = eqn.params["dimension_numbers"]
    lv, rv = views
    lhs, rhs, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    if eqn.params.get("feature_group_count", 1) != 1 or \
        eqn.params.get("batch_group_count", 1) != 1:
      self.break_all(views)
      return (None,) * len(eqn.outvars[0].aval.shape)
    t = self.contract(lv[lhs[1]], rv[rhs[1]], shapes[0][lhs[1]])
    if t is not None and flags[0] and not flags[1]:
      self.consumed.add(t.group)
    if isinstance(rv[rhs[0]], _Tag) and not flags[1]:
      self.produced.add(rv[rhs[0]].group)
    self.break_all([[lv[d] for d in lhs[2:]], [rv[d] for d in rhs[2:]]])  # windows mix
    out = [None] * len(eqn.outvars[0].aval.shape)
    out[out_spec[0]] = lv[lhs[0]]
    out[out_spec[1]] = rv[rhs[0]]
    return tuple(out)


def _axis_groups(old, new):
  """Pairs (old axes, new axes) of a reshape: one old axis split into new ones, or
  several old axes merged into one; size-1 axes on their own. ``None`` otherwise."""
  out, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
      out.append(((i,), ()))
      i += 1
      continue
    if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
      out.append(((), (j,)))
      j += 1
      continue
    if i >= len(old) or j >= len(new):
      return None
    if old[i] == new[j]:
      out.append(((i,), (j,)))
      i, j = i + 1, j + 1
    elif old[i] > new[j]:  # split old[i]
      news = _run_to(new, j, old[i])
      if news is None:
        return None
      out.append(((i,), news))
      i, j = i + 1, j + len(news)
    else:  # merge into new[j]
      olds = _run_to(old, i, new[j])
      if olds is None:
        return None
      out.append((olds, (j,)))
      i, j = i + len(olds), j + 1
  return out


def _run_to(sizes, start: int, target: int) -> tuple[int, ...] | None:
  """The indices ``start, start + 1, ...`` of ``sizes`` whose product first reaches
  ``target``; ``None`` when it passes ``target`` or the sizes run out first."""
  idx, prod = [], 1
  for k in range(start, len(sizes)):
    if prod >= target:
      break
    idx.append(k)
    prod *= sizes[k]
  return tuple(idx) if prod == target else None


def unit_groups(apply_fn: Callable, variables: Any, *example: Any) -> list[UnitGroup]:
  """The removable unit groups of ``apply_fn(variables, *example)`` (module docstring).

  ``variables`` is any pytree (params, or params and model state together): every leaf
  takes part, so BatchNorm statistics passed in it are found as members. Member paths are
  ``/``-joined paths in ``variables``.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(variables)
  paths = [_paths.path_str(p) for p, _ in flat]
  shapes = [tuple(np.shape(x)) for _, x in flat]
  closed = jax.make_jaxpr(apply_fn)(variables, *example)
  groups = _Groups()
  ins = [tuple(_Tag(groups.new(n, {(k, a, 1, 1)}), 1) if n > 1 else BCAST
               for a, n in enumerate(shape)) for k, shape in enumerate(shapes)]
  rest = len(closed.jaxpr.invars) - len(flat)
  flow = _Flow(groups)
  outs, _ = flow.run(closed.jaxpr, ins + [None] * rest, [False] * len(flat) + [True] * rest)
  flow.break_all(outs)  # what leaves the model is never removed
  root = groups.find
  produced = groups.closure(flow.produced)
  consumed = groups.closure(flow.consumed)
  # a weight contracting several unit axes at once (an attention output projection reads
  # (heads, head_dim)): the outer axis is the unit (the head), the inner ones are not
  inner = {root(g) for joint in flow.joint for g in joint[1:]} - {root(j[0]) for j in flow.joint}
  found = []
  for r in sorted({root(g) for g in range(len(groups.parent))}):
    nodes = groups.nodes[r]
    if (groups.broken[r] or groups.units[r] < 2 or r not in produced or r not in consumed
        or r in inner):
      continue
    members = tuple(sorted(Member(paths[leaf], axis, block, rep)
                           for leaf, axis, block, rep in nodes))
    found.append(UnitGroup(groups.units[r], members))
  return found
