"""The transform abstraction: pure functions from dense params to compressed params.

A :class:`Transform` is an optax-style ``NamedTuple`` of pure functions. Its state is a
:class:`TransformState` pytree the caller holds (and checkpoints): ``trainable`` is trained
by the optimiser together with the params (low-rank factors), ``aux`` is not (stored masks).
Both are dicts keyed by leaf path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vcon_jax import _paths, _selection, _validate
from vcon_jax._spec import LeafSpec

Params = Any


class TransformState(NamedTuple):
  """State of a transform: ``trainable`` (optimised) and ``aux`` (not differentiated)."""

  trainable: Any
  aux: Any


class Transform(NamedTuple):
  """A compression transform (see :func:`vcon_jax.prune` and friends).

  Attributes:
    init: ``params -> TransformState``. Validates the selection (raises ``ValueError``).
    apply: ``(params, state, beta, count=0, *, exact=False) -> params``: every selected leaf
      ``w`` becomes ``beta * w + (1 - beta) * C(w)``. With ``exact=False`` the result carries
      training gradients (straight-through for prune/quantize); with ``exact=True`` it is
      computed without the straight-through trick, so at ``beta = 0`` it holds exactly the
      compressed values (for export and evaluation).
    refresh: ``(params, state, count) -> state``: the non-gradient state change after
      each optimiser step (e.g. recomputing a stored mask every ``update_every`` steps).
      Not optax's ``update``: it sees the new params and returns only the state.
    select: ``(path, leaf) -> bool``: which leaves the transform compresses.
    describe: ``(path, leaf, state, count) -> tuple[LeafSpec, ...]``: what was done to the
      leaf, one :class:`~vcon_jax.LeafSpec` per compression in the order applied (``()``
      for a leaf it does not select).
    reselect: ``Discovery -> Transform | None``: the same compression on the linear maps a
      trace of the model found (:func:`vcon_jax.discover`), with their traced input axes
      and stacks; ``None`` (the field, or its result) keeps the selection as given. For
      built transforms it is a replace of their :class:`vcon_jax.Selection`
      (:meth:`~vcon_jax.Selection.traced`): ``where`` / ``exclude`` / ``outputs`` still
      narrow and declared ``in_axes`` / ``stacked`` still win.
    selection: the :class:`vcon_jax.Selection` of a built transform (``None`` for a
      custom one).

  A custom transform is exported by :func:`vcon_jax.export` when:

  * ``apply(params, state, 0.0, count, exact=True)`` gives the compressed values (these
    are what is stored, bit for bit);
  * ``select`` is true for every leaf it changes (other leaves are stored as they are);
  * ``describe`` returns a tuple of ``LeafSpec`` for selected leaves. Its fields choose the
    compact encodings tried: ``bits`` (k-bit codes; 1 is binary), ``per_channel``,
    ``pattern`` (n:m positions), ``factors`` and ``rank`` on the last spec (stored as the
    factors). Sparse layouts and binary codes are always tried. Every candidate is
    decoded and compared with the values before it is chosen, so a wrong spec costs
    size, never correctness. With ``()`` for a selected leaf, export also tries 2 to 8
    bit codes when the values have few enough distinct magnitudes.
  """

  init: Callable[[Params], TransformState]
  apply: Callable[..., Params]
  refresh: Callable[[Params, TransformState, Any], TransformState]
  select: Callable[[str, Any], bool]
  describe: Callable[..., tuple[LeafSpec, ...]]
  reselect: Callable[[Any], Any] | None = None
  selection: Any = None


class RuleInit(Protocol):
  """``init(path, w, *, axes) -> (trainable, aux)``: a rule's state for one leaf (either
  may be ``None``); raises ``ValueError`` for a leaf it cannot compress."""

  def __call__(self, path: str, w: jax.Array, *, axes: tuple[int, ...] | None
               ) -> tuple[Any, Any]: ...


class RuleCompress(Protocol):
  """``compress(w, *, axes, trainable, aux, count) -> C(w)``: the compressed value only.
  How the gradient passes is the rule's ``gradient``, applied by :func:`leafwise`."""

  def __call__(self, w: jax.Array, *, axes: tuple[int, ...] | None, trainable: Any,
               aux: Any, count: Any) -> jax.Array: ...


class RuleRefresh(Protocol):
  """``refresh(w, *, axes, trainable, aux, count) -> aux`` after an optimiser step."""

  def __call__(self, w: jax.Array, *, axes: tuple[int, ...] | None, trainable: Any,
               aux: Any, count: Any) -> Any: ...


class RuleDescribe(Protocol):
  """``describe(w, *, axes, trainable, count) -> LeafSpec``: what was done to the leaf."""

  def __call__(self, w: jax.Array, *, axes: tuple[int, ...] | None, trainable: Any,
               count: Any) -> LeafSpec: ...


#: How a rule's gradient reaches ``w``: ``"straight_through"`` (the rule's ``C`` sees
#: ``stop_gradient(w)`` and the gradient of ``C(w)`` passes to ``w`` unchanged) or ``"true"``
#: (``C`` is differentiated as written: low rank, whose factors are trained).
GRADIENTS = ("straight_through", "true")


def straight_through(w: jax.Array, c: jax.Array) -> jax.Array:
  """``c`` in the forward pass, gradient 1 to ``w``: ``c + (w - stop_gradient(w))``.

  The one straight-through form of the library. Its forward value is exactly ``c``
  (``w - w`` is 0); the other usual form, ``w + stop_gradient(c - w)``, rounds ``c - w``
  when ``|w|`` is far from ``|c|`` (a binarised outlier), so the training view at
  ``beta = 0`` would not be the exported one. ``c`` must not depend on ``w`` through a
  gradient path (compute it from ``stop_gradient(w)``).
  """
  return c + (w - lax.stop_gradient(w))


class LeafRule(NamedTuple):
  """How one kind of compression acts on a single selected leaf (:func:`leafwise`).

  ``axes`` is the leaf's tuple of input axes (:func:`vcon_jax._paths.input_axes`) when
  ``needs_axes`` is true, else ``None``. The functions take keyword arguments after the
  leaf (see their Protocols): ``init`` (:class:`RuleInit`), ``compress``
  (:class:`RuleCompress`, returns only ``C(w)``), ``refresh`` (:class:`RuleRefresh`, or
  ``None``), ``describe`` (:class:`RuleDescribe`; ``leafwise`` sets the spec's
  ``in_axes`` when they are not Flax's default, every axis but the last). ``gradient``
  (one of :data:`GRADIENTS`) says how training differentiates ``C``; evaluation and export
  (``exact=True``) use ``C(w)`` as it is.
  """

  init: RuleInit
  compress: RuleCompress
  refresh: RuleRefresh | None
  describe: RuleDescribe
  needs_axes: bool = False
  gradient: str = "straight_through"


def low_precision(dtype: Any) -> bool:
  """True for floating dtypes narrower than float32 (bfloat16, float16, fp8)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def rounded(x: Any, dtype: Any = None) -> Any:
  """``x`` rounded to ``dtype`` (default its own) *for real*, also inside ``jax.jit``.

  XLA may keep a bfloat16 / float16 value that was computed in float32 unrounded when
  the next operation upcasts it again (``xla_allow_excess_precision``, on by default): a
  weight the optimiser just wrote then reaches the compression with bits the stored
  weight does not have, and a value on a rounding tie (``W / scale = -3.5``) lands on
  another level than in an eager call. An optimisation barrier between the two converts
  keeps the rounding. A no-op for float32 and wider (and outside ``jit``).
  """
  dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  if not low_precision(dtype):
    return x.astype(dtype) if x.dtype != dtype else x
  return lax.optimization_barrier(x.astype(dtype))


def blend(w: jax.Array, c: jax.Array, beta: Any) -> jax.Array:
  """``beta * w + (1 - beta) * c`` in ``w``'s dtype (a Python 0 or 1 short-circuits).

  Both inputs are :func:`rounded` to ``w``'s dtype first, so the result is the same
  under ``jit`` and eagerly, in every dtype.
  """
  c = rounded(c, w.dtype)
  if isinstance(beta, (int, float)):
    if beta == 0:
      return c
    if beta == 1:
      return w
  beta = jnp.asarray(beta, jnp.float32)
  dense = beta * rounded(w).astype(jnp.float32)
  comp = (1.0 - beta) * c.astype(jnp.float32)
  if low_precision(w.dtype):  # no fused multiply-add under jit: the eager value
    dense, comp = lax.optimization_barrier((dense, comp))
  return (dense + comp).astype(w.dtype)


def _no_match_error(name: str, sel: Any, params: Params) -> ValueError:
  leaves = _paths.leaf_paths(params)
  paths = [f"{p} {tuple(getattr(l, 'shape', ()))}" for p, l in leaves]
  shown = ", ".join(paths[:12]) + (" ..." if len(paths) > 12 else "")
  not_float = [f"{p} ({getattr(l, 'dtype', type(l).__name__)})" for p, l in leaves
               if getattr(l, "ndim", 0) >= 1 and not _paths.is_floating(l)]
  why = (f" Not floating, so never compressed: {', '.join(not_float[:6])}"
         f"{' ...' if len(not_float) > 6 else ''}." if not_float else "")
  how = ("The trace found no linear map there (lookup tables, tied embeddings, biases, "
         "norms and the model's output layer stay dense)." if sel.is_traced else
         "Without a trace the candidates are Flax's 'kernel' leaves outside lookup tables "
         "(vj.DEFAULT_EXCLUDE); pass example= (make_train_step(..., example=x), or "
         "wrap_optax(..., apply_fn=, params=, example=)) so a trace finds the linear maps.")
  return ValueError(
      f"{name}(where={sel.where!r}, exclude={sel.exclude!r}) selects no parameter to "
      f"compress. {how} Patterns match (`re.search`) /-joined leaf paths; the params "
      f"have: {shown}.{why}")


def leafwise(rule: LeafRule, *, name: str, selection: Any = None, where: str | None = None,
             exclude: str | None = None, in_axes: _paths.InAxes = None,
             include_non_kernels: bool = False,
             stacked: Mapping[str, int] | None = None) -> Transform:
  """Builds a :class:`Transform` applying ``rule`` to every leaf ``selection`` (a
  :class:`vcon_jax.Selection`) picks, with the input axes it gives (when the rule needs
  them), resolved (or refused) at ``init``, before any jit. A stack of layers (traced, or
  declared with ``Selection(stacked=...)``) gets the rule once per layer (``jax.vmap``
  over its stack axes): every layer its own threshold, scales, mask and factors. The
  0.3 keywords (``where`` ... ``stacked``) still work, with a ``DeprecationWarning``.
  """
  sel = _selection.from_keywords(name, selection, where=where, exclude=exclude,
                                 in_axes=in_axes, include_non_kernels=include_non_kernels,
                                 stacked=stacked)
  resolver = sel.resolver(name, rule.needs_axes)
  select = resolver.select

  def plan(path, leaf):
    return resolver.plan(path, leaf) or (None, 0)

  def axes_of(path, leaf):
    """The input axes the rule sees: of one layer for a stack."""
    axes, k = plan(path, leaf)
    return axes if axes is None or k == 0 else tuple(a - k for a in axes)

  def per_layer(path, leaf, fn, *args):
    for _ in range(plan(path, leaf)[1]):
      fn = jax.vmap(fn)
    return fn(*args)

  def init_per_layer(path, leaf, axes):
    # a rule's init may run host code (the SVD of low rank): one call per layer, stacked
    k = plan(path, leaf)[1]
    if k == 0:
      return rule.init(path, leaf, axes=axes)
    layers = [rule.init(path, leaf[index], axes=axes) for index in np.ndindex(leaf.shape[:k])]
    shape = leaf.shape[:k]
    return jax.tree.map(
        lambda *xs: jnp.stack(xs).reshape(shape + jnp.shape(xs[0])), *layers)

  def init(params: Params) -> TransformState:
    trainable, aux = {}, {}
    chosen = resolver.check(params)
    if not chosen:
      raise _no_match_error(name, sel, params)
    flat = dict(_paths.leaf_paths(params))
    for path in chosen:
      leaf = flat[path]
      tr, ax = init_per_layer(path, leaf, axes_of(path, leaf))
      if tr is not None:
        trainable[path] = tr
      if ax is not None:
        aux[path] = ax
    return TransformState(trainable, aux)

  if rule.gradient not in GRADIENTS:
    raise ValueError(f"{name}: LeafRule.gradient must be one of {GRADIENTS}, got "
                     f"{rule.gradient!r}.")

  def compressed(w, axes, trainable, aux, count, exact):
    """``C(w)``, for training with the rule's gradient."""
    if exact or rule.gradient == "true":
      return rule.compress(w, axes=axes, trainable=trainable, aux=aux, count=count)
    c = rule.compress(lax.stop_gradient(w), axes=axes, trainable=trainable, aux=aux,
                      count=count)
    return straight_through(w, c)

  def apply(params, state, beta, count=0, *, exact=False):
    def one(path, leaf):
      p = _paths.path_str(path)
      if not select(p, leaf):
        return leaf
      leaf = rounded(leaf)
      axes = axes_of(p, leaf)
      c = per_layer(p, leaf, lambda w, tr, ax: compressed(w, axes, tr, ax, count, exact),
                    leaf, state.trainable.get(p), state.aux.get(p))
      return blend(leaf, c, beta)
    return jax.tree_util.tree_map_with_path(one, params)

  def refresh(params, state, count):
    if rule.refresh is None:
      return state
    flat = dict(_paths.leaf_paths(params))

    def one(p, a):
      axes = axes_of(p, flat[p])
      return per_layer(p, flat[p],
                       lambda w, tr, ax: rule.refresh(w, axes=axes, trainable=tr, aux=ax,
                                                      count=count),
                       rounded(flat[p]), state.trainable.get(p), a)
    aux = {p: one(p, a) for p, a in state.aux.items()}
    return TransformState(state.trainable, aux)

  def describe(path, leaf, state, count=0):
    if not select(path, leaf):
      return ()
    axes = plan(path, leaf)[0]  # a stack is described (and exported) as one leaf
    trainable = None if state is None else state.trainable.get(path)
    spec = rule.describe(leaf, axes=axes, trainable=trainable, count=count)
    if axes is not None and tuple(axes) != tuple(range(leaf.ndim - 1)):
      spec = dataclasses.replace(spec, in_axes=tuple(axes))
    return (spec,)

  def reselect(found):
    if sel.include_non_kernels:
      return None  # the user took whole tensors by names: kept as given
    return leafwise(rule, name=name, selection=sel.traced(found))

  return Transform(init, apply, refresh, select, describe, reselect, sel)


def _validate_schedule(name: str, schedule: Any) -> None:
  if schedule is None:
    return
  if not callable(schedule):
    raise ValueError(f"{name} must be a callable schedule (count -> beta) or None, got "
                     f"{schedule!r}.")
  # A member's own beta may hold a partial blend (e.g. constant(0.5)) on purpose: a
  # constant of at least 1 % is accepted; anything else must start at 1 or 0.
  _validate.check_beta_schedule(schedule, name, allow_constant=True)


def chain(*transforms: Transform, schedules: Any = None) -> Transform:
  """Composes transforms: ``C = C_n o ... o C_1``.

  Without ``schedules`` one beta blends the dense weight with the fully compressed one,
  ``beta * w + (1 - beta) * C_n(...C_1(w))``. With ``schedules`` (one per member, ``None``
  meaning "use the train step's beta"), member ``i`` blends its own input with its output
  using ``schedules[i](count)``, so each compression vanishes in on its own timetable.
  Member schedules are checked when ``chain`` is called
  (:func:`vcon_jax.check_beta_schedule` with ``allow_constant=True``): every value in
  ``[0, 1]``, starting at 1 or 0 (staying at 0 then) unless constant, so a learning-rate
  schedule passed by mistake is refused.

  >>> import vcon_jax as vj
  >>> t = vj.chain(vj.prune(sparsity=0.5), vj.quantize(bits=8))
  """
  if not transforms:
    raise ValueError("chain() needs at least one transform, got none.")
  for i, t in enumerate(transforms):
    if not isinstance(t, Transform):
      raise ValueError(f"chain() member {i} must be a vcon_jax Transform (from prune, "
                       f"quantize, binarize, low_rank, chain), got {type(t).__name__}.")
  if schedules is not None:
    schedules = tuple(schedules)
    if len(schedules) != len(transforms):
      raise ValueError(f"chain(schedules=...) needs one schedule (or None) per member: "
                       f"{len(transforms)} members, {len(schedules)} schedules.")
    for i, s in enumerate(schedules):
      _validate_schedule(f"chain schedules[{i}]", s)

  def select(path, leaf):
    return any(t.select(path, leaf) for t in transforms)

  def init(params):
    states, x = [], params
    for i, t in enumerate(transforms):
      s = t.init(x)
      states.append(s)
      if i + 1 < len(transforms):  # the next member starts from this one's output
        x = t.apply(x, s, 0.0, 0, exact=True)
    return TransformState(tuple(s.trainable for s in states), tuple(s.aux for s in states))

  def member_states(state):
    return [TransformState(tr, ax) for tr, ax in zip(state.trainable, state.aux)]

  def apply(params, state, beta, count=0, *, exact=False):
    x = params
    if schedules is not None:
      for t, s, sched in zip(transforms, member_states(state), schedules):
        x = t.apply(x, s, beta if sched is None else sched(count), count, exact=exact)
      return x
    for t, s in zip(transforms, member_states(state)):
      x = t.apply(x, s, 0.0, count, exact=exact)
    def one(path, w, c):
      return blend(w, c, beta) if select(_paths.path_str(path), w) else w
    return jax.tree_util.tree_map_with_path(one, params, x)

  def refresh(params, state, count):
    new, x = [], params
    for t, s in zip(transforms, member_states(state)):
      s = t.refresh(x, s, count)
      new.append(s)
      x = t.apply(x, s, 0.0, count, exact=True)
    return TransformState(tuple(s.trainable for s in new), tuple(s.aux for s in new))

  def describe(path, leaf, state, count=0):
    return tuple(spec for t, s in zip(transforms, member_states(state))
                 for spec in t.describe(path, leaf, s, count))

  def reselect(found):
    new = [reselected(t, found) for t in transforms]
    if all(n is t for n, t in zip(new, transforms)):
      return None
    return chain(*new, schedules=schedules)

  traced = [t.selection for t in transforms if getattr(t, "selection", None) is not None]
  return Transform(init, apply, refresh, select, describe, reselect,
                   next((s for s in traced if s.is_traced), traced[0] if traced else None))


def reselected(transform: Transform, found: Any) -> Transform:
  """``transform`` on the linear maps ``found`` traced (:attr:`Transform.reselect`), or
  ``transform`` itself when its selection was given explicitly or it cannot re-select.
  Public as ``vj.reselect``.

  >>> import jax.numpy as jnp, vcon_jax as vj
  >>> params = {"w": jnp.ones((3, 4)), "scale": jnp.ones(4), "head": jnp.ones((4, 2))}
  >>> f = lambda p, x: ((x @ p["w"]) * p["scale"]) @ p["head"]
  >>> found = vj.discover(f, params, jnp.ones((2, 3)))
  >>> found.outputs  # the output layer: kept dense unless Selection(outputs=...) names it
  ('head',)
  >>> t = vj.reselect(vj.prune(0.5), found)
  >>> [p for p in params if t.select(p, params[p])]
  ['w']
  """
  if getattr(transform, "reselect", None) is None:
    return transform
  new = transform.reselect(found)
  return transform if new is None else new


def compress(transform: Transform, params: Params, state: TransformState,
             count: Any = 0) -> Params:
  """The exact compressed view (``beta = 0``), same tree as ``params``."""
  return transform.apply(params, state, 0.0, count, exact=True)


def identity() -> Transform:
  """No compression: the plain fine-tuning (and dense pretraining) step.

  >>> import vcon_jax as vj
  >>> vj.identity().init({"w": 1.0})
  TransformState(trainable={}, aux={})
  """
  return Transform(
      init=lambda params: TransformState({}, {}),
      apply=lambda params, state, beta, count=0, *, exact=False: params,
      refresh=lambda params, state, count: state,
      select=lambda path, leaf: False,
      describe=lambda path, leaf, state, count=0: ())
