"""The transform abstraction: pure functions from dense params to compressed params.

A :class:`Transform` is an optax-style ``NamedTuple`` of pure functions. Its state is a
:class:`TransformState` pytree the caller holds (and checkpoints): ``trainable`` is trained
by the optimiser together with the params (low-rank factors), ``aux`` is not (stored masks).
Both are dicts keyed by leaf path.

The extension point (public, as ``vj.LeafRule``, ``vj.leafwise`` ...): a compression is a
:class:`LeafRule` (what it does to one leaf: ``init``, ``compress``, ``refresh``,
``describe``, typed by the Protocols :class:`RuleInit`, :class:`RuleCompress`,
:class:`RuleRefresh`, :class:`RuleDescribe`) that :func:`leafwise` turns into a
:class:`Transform` over the leaves a :class:`vcon_jax.Selection` picks. Every built-in
compression but ``prune_units`` is one; ``prune_units`` (a rule over groups of leaves)
shares its last step, :func:`blend_leaf`.
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


def check_transform(transform: Any) -> None:
  """Refuses anything but a :class:`Transform` (a ``ValueError`` naming its type)."""
  if not isinstance(transform, Transform):
    raise ValueError(f"transform must be a vcon_jax Transform (prune, quantize, "
                     f"binarize, low_rank, chain), got {type(transform).__name__}.")


class RuleInit(Protocol):
  """``init(path, w, *, axes) -> (trainable, aux)``: a rule's state for one leaf.

  Called once per selected leaf at ``Transform.init``, outside ``jit`` (host code such as
  an SVD is fine). ``trainable`` is trained by the optimiser with the params (low-rank
  factors), ``aux`` is not (a stored mask); either may be ``None``. Raise ``ValueError``
  (naming ``path``) for a leaf the rule cannot compress: it is reported before training.
  """

  def __call__(self, path: str, w: jax.Array, *, axes: tuple[int, ...] | None
               ) -> tuple[Any, Any]: ...


class RuleCompress(Protocol):
  """``compress(w, *, axes, trainable, aux, count) -> C(w)``: the compressed value only,
  same shape and dtype as ``w``; ``count`` is the step (maybe traced: use ``jnp``). How
  the gradient passes is the rule's ``gradient``, applied by :func:`leafwise`."""

  def __call__(self, w: jax.Array, *, axes: tuple[int, ...] | None, trainable: Any,
               aux: Any, count: Any) -> jax.Array: ...


class RuleRefresh(Protocol):
  """``refresh(w, *, axes, trainable, aux, count) -> aux`` after each optimiser step (a
  stored mask recomputed every few steps); ``None`` in a rule without ``aux``."""

  def __call__(self, w: jax.Array, *, axes: tuple[int, ...] | None, trainable: Any,
               aux: Any, count: Any) -> Any: ...


class RuleDescribe(Protocol):
  """``describe(w, *, axes, trainable, count) -> LeafSpec``: what was done to the leaf,
  for export and :func:`vcon_jax.summary`. Called outside ``jit`` with concrete values.
  ``kind`` is the name shown; ``bits``, ``per_channel``, ``group_size``, ``symmetric``,
  ``pattern`` and ``rank`` + ``factors`` choose the compact encodings export tries (a
  wrong field costs size, never exactness: every candidate is decoded and compared)."""

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
  r"""How one kind of compression acts on a single selected leaf; :func:`leafwise` makes
  it a :class:`Transform`.

  The functions take the leaf, then keyword arguments (see their Protocols): ``init``
  (:class:`RuleInit`), ``compress`` (:class:`RuleCompress`: returns only ``C(w)``),
  ``refresh`` (:class:`RuleRefresh`, or ``None``), ``describe`` (:class:`RuleDescribe`;
  ``leafwise`` sets the spec's ``in_axes`` when they are not Flax's default, every axis
  but the last).

  Attributes:
    init, compress, refresh, describe: the rule's functions (above).
    needs_axes: the functions get ``axes``, the leaf's tuple of input axes (per output unit
      statistics reduce over them with ``keepdims=True``); the
      selection then refuses, at ``init``, a leaf whose input axes names cannot settle
      (pass ``example=`` to the step so a trace reads them). ``False``: ``axes=None``.
    gradient: how training differentiates ``C`` (:data:`GRADIENTS`):
      ``"straight_through"`` (default: ``compress`` sees ``stop_gradient(w)`` and the
      gradient passes to ``w`` unchanged, :math:`\partial C / \partial W := I`) or
      ``"true"`` (``compress`` is differentiated as written: low rank's trained factors).
      Evaluation and export (``exact=True``) use ``C(w)`` as it is.

  >>> import jax.numpy as jnp, vcon_jax as vj
  >>> halve = vj.LeafRule(
  ...     init=lambda path, w, *, axes: (None, None),
  ...     compress=lambda w, *, axes, trainable, aux, count: w / 2,
  ...     refresh=None,
  ...     describe=lambda w, *, axes, trainable, count: vj.LeafSpec("halve"))
  >>> t = vj.leafwise(halve, name="halve")
  >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  >>> out = t.apply(params, t.init(params), beta=0.0)
  >>> out["Dense_0"]["kernel"][0], out["Dense_0"]["bias"]
  (Array([0.5, 0.5, 0.5], dtype=float32), Array([1., 1., 1.], dtype=float32))
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


def blend_leaf(w: jax.Array, c: jax.Array, beta: Any, *, exact: bool = False,
               gradient: str = "straight_through") -> jax.Array:
  r"""One compressed leaf blended in: ``beta * w + (1 - beta) * c``, with ``c``'s gradient.

  .. math:: \bar W = \beta W + (1 - \beta) C(W)

  The last step of every compression (:func:`leafwise` and :func:`vcon_jax.prune_units`
  end with it); a hand-written :class:`Transform` ends with it too. Training
  (``exact=False``) with ``gradient="straight_through"`` passes the gradient of ``c`` to
  ``w`` as the library's one straight-through form, ``c + (w - stop_gradient(w))``,
  exactly ``c`` forward; ``gradient="true"`` or ``exact=True`` use ``c`` as it is. The
  blend is done in ``w``'s dtype and rounded to it for real, so the result is the same
  under ``jax.jit`` and eagerly, in every dtype; a Python ``beta`` of 0 or 1 returns ``c``
  or ``w``.

  Args:
    w: the leaf (dense weight).
    c: ``C(w)``, computed from ``jax.lax.stop_gradient(w)`` for a straight-through
      gradient (from ``w`` itself for ``gradient="true"``).
    beta: blend factor in ``[0, 1]`` (may be traced).
    exact: ``True`` for evaluation and export: ``c`` without the straight-through term.
    gradient: ``"straight_through"`` or ``"true"`` (:attr:`LeafRule.gradient`).

  >>> import jax, jax.numpy as jnp, vcon_jax as vj
  >>> w = jnp.array([0.3, -1.2, 2.0])
  >>> prune_small = lambda w: jnp.where(jnp.abs(w) > 0.5, w, 0.0)
  >>> vj.blend_leaf(w, prune_small(jax.lax.stop_gradient(w)), 0.5)
  Array([ 0.15, -1.2 ,  2.  ], dtype=float32)
  >>> jax.grad(lambda w: vj.blend_leaf(w, prune_small(jax.lax.stop_gradient(w)), 0.0)
  ...          .sum())(w)  # straight-through: the gradient passes the pruned entry too
  Array([1., 1., 1.], dtype=float32)
  """
  if gradient not in GRADIENTS:
    raise ValueError(f"blend_leaf: gradient must be one of {GRADIENTS}, got {gradient!r}.")
  w = rounded(w)
  if not exact and gradient == "straight_through":
    c = straight_through(w, c)
  return blend(w, c, beta)


def _no_match_error(name: str, sel: Any, params: Params) -> ValueError:
  leaves = _paths.leaf_paths(params)
  paths = [f"{p} {tuple(getattr(leaf, 'shape', ()))}" for p, leaf in leaves]
  shown = ", ".join(paths[:12]) + (" ..." if len(paths) > 12 else "")
  not_float = [f"{p} ({getattr(leaf, 'dtype', type(leaf).__name__)})" for p, leaf in leaves
               if getattr(leaf, "ndim", 0) >= 1 and not _paths.is_floating(leaf)]
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
  r"""A :class:`Transform` applying ``rule`` to every leaf ``selection`` picks: the public
  way to add a compression (every built-in leaf-by-leaf one is built with it).

  .. math:: \bar W = \beta W + (1 - \beta) C(W) \text{ for each selected leaf } W

  The leaves and their input axes (when ``rule.needs_axes``) are resolved, or refused, at
  ``init``, before any ``jit``; ``make_train_step(example=)`` and ``wrap_optax(apply_fn=,
  params=, example=)`` re-select the transform onto the linear maps a trace finds. A stack
  of layers (traced, or declared with ``Selection(stacked=...)``) gets the rule once per
  layer (``jax.vmap`` over its stack axes): every layer its own statistics and state. Each
  leaf ends with :func:`blend_leaf`, the library's one blend and straight-through step;
  the state, the train step, the optax wrapper and export then treat the result as any
  built-in.

  Args:
    rule: what the compression does to one leaf (:class:`LeafRule`).
    name: the compression's name, used in error messages (and by convention the
      ``kind`` its ``describe`` returns).
    selection: which leaves, and how each is read (:class:`vcon_jax.Selection`); default:
      the linear maps a trace finds, else Flax's ``kernel`` leaves by names.
    where, exclude, in_axes, include_non_kernels, stacked: deprecated (0.3); the fields of
      :class:`vcon_jax.Selection` of the same names (a ``DeprecationWarning``).

  Returns:
    A :class:`Transform`, like :func:`vcon_jax.prune` returns.

  Raises:
    ValueError: ``rule.gradient`` is not one of :data:`GRADIENTS` (here); no leaf
      selected, or ``rule.init`` refuses one (at ``init``).

  >>> import jax.numpy as jnp, vcon_jax as vj
  >>> def sign_mean(w, *, axes, trainable, aux, count):  # sign times each unit's mean |w|
  ...   return jnp.where(w >= 0, 1.0, -1.0) * jnp.mean(jnp.abs(w), axis=axes, keepdims=True)
  >>> rule = vj.LeafRule(
  ...     init=lambda path, w, *, axes: (None, None), compress=sign_mean, refresh=None,
  ...     describe=lambda w, *, axes, trainable, count: vj.LeafSpec(
  ...         "sign_mean", bits=1, per_channel=True),
  ...     needs_axes=True)
  >>> t = vj.leafwise(rule, name="sign_mean", selection=vj.Selection(where="Dense_0"))
  >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0], [-3.0, 4.0]])},
  ...           "Dense_1": {"kernel": jnp.ones((2, 2))}}
  >>> state = t.init(params)
  >>> t.apply(params, state, 0.0)["Dense_0"]["kernel"]
  Array([[ 2., -3.],
         [-2.,  3.]], dtype=float32)
  >>> t.select("Dense_1/kernel", params["Dense_1"]["kernel"])
  False
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
    """``C(w)``, from ``stop_gradient(w)`` when training straight-through."""
    if not exact and rule.gradient == "straight_through":
      w = lax.stop_gradient(w)
    return rule.compress(w, axes=axes, trainable=trainable, aux=aux, count=count)

  def apply(params, state, beta, count=0, *, exact=False):
    def one(path, leaf):
      p = _paths.path_str(path)
      if not select(p, leaf):
        return leaf
      leaf = rounded(leaf)
      axes = axes_of(p, leaf)
      c = per_layer(p, leaf, lambda w, tr, ax: compressed(w, axes, tr, ax, count, exact),
                    leaf, state.trainable.get(p), state.aux.get(p))
      return blend_leaf(leaf, c, beta, exact=exact, gradient=rule.gradient)
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
