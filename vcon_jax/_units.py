"""Structured pruning: whole units (MLP hidden units, attention heads, channels) removed.

``vj.find_units(model, params, example)`` reads the unit groups from the model's data flow
(:mod:`vcon_jax._coupling`); ``vj.prune_units(fraction, units=found)`` is a transform
that, in each group, keeps the units with the largest L2 norm over all their coupled
slices and zeroes the rest in every member leaf (the producer's output columns and bias,
the norm and BatchNorm params on the way, the consumer's input rows), recomputed at every
step like the masks of :func:`vcon_jax.prune`; :func:`vcon_jax.shrink` then removes the
zeroed units, so the model is physically smaller.

Not to be confused with ``vj.prune(granularity="neuron")``, which keeps the largest
weights *inside* each output unit and removes no unit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax import lax

from vcon_jax import _coupling, _model, _paths, _validate
from vcon_jax._coupling import Member, UnitGroup
from vcon_jax._spec import LeafSpec
from vcon_jax._topk import topk_mask
from vcon_jax._transform import Transform, TransformState, blend_leaf, rounded


@dataclasses.dataclass(frozen=True)
class Units:
  """The unit groups of a model (:func:`find_units`), in params paths. ``state_members``
  holds, per group, its members in the model state (BatchNorm statistics): not trained,
  so not masked, but removed by :func:`shrink`."""

  groups: tuple[UnitGroup, ...]
  state_members: tuple[tuple[Member, ...], ...] = ()

  def __len__(self):
    return len(self.groups)

  def __str__(self):
    lines = []
    for i, g in enumerate(self.groups):
      state = self.state_members[i] if self.state_members else ()
      extra = "".join(f", state:{m.path}[axis {m.axis}]" for m in state)
      lines.append(f"group {i}: {g.describe()}{extra}")
    return "\n".join(lines) if lines else "(no removable unit group)"

  def where(self, pattern: str) -> "Units":
    """The groups with a member whose path matches ``pattern`` (``re.search``)."""
    rx = _paths.compile_pattern("where", pattern)
    keep = [i for i, g in enumerate(self.groups) if any(rx.search(m.path) for m in g.members)]
    return Units(tuple(self.groups[i] for i in keep),
                 tuple(self.state_members[i] for i in keep) if self.state_members else ())


def find_units(model: Any, params: Any = None, *example: Any) -> Units:
  """The removable unit groups of a model, from one trace of its computation.

  ``model`` is a Flax Linen or NNX module (``params``: Linen's variables or their
  ``'params'``; for NNX ``None`` or ``nnx.state(module, nnx.Param)``), or any function
  ``model(params, *example)`` (Equinox, plain JAX). ``example``: an input batch (its
  values are not used; only shapes and dtypes are traced).

  >>> import jax, jax.numpy as jnp, flax.linen as nn, vcon_jax as vj
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     h = nn.relu(nn.Dense(16)(x))  # Dense_0 (Linen numbers layers as they are built)
  ...     return nn.Dense(3)(h)
  >>> x = jnp.ones((2, 5)); params = MLP().init(jax.random.key(0), x)["params"]
  >>> print(vj.find_units(MLP(), params, x))
  group 0: 16 units: Dense_0/bias[axis 0], Dense_0/kernel[axis 1], Dense_1/kernel[axis 0]
  """
  if not example:
    raise ValueError("find_units needs an example input: find_units(model, params, x).")
  if isinstance(model, (nn.Module, nnx.Module)):
    if len(example) > 1:
      raise ValueError(f"find_units(module, params, x) runs the module on one input; "
                       f"{type(model).__name__} takes {len(example)} here: pass a function "
                       f"instead, find_units(lambda params, *xs: ..., params, *xs).")
    adapter = _model.make_adapter(model, None, None)
    pure, model_state = adapter.split(params)
    fn = lambda v, *x: adapter.apply(v["params"], v["state"], *x, None, False)[0]  # noqa: E731
    found = _coupling.unit_groups(fn, {"params": pure, "state": model_state}, *example)
    groups, states = [], []
    for g in found:
      mine = tuple(dataclasses.replace(m, path=m.path[len("params/"):]) for m in g.members
                   if m.path.startswith("params/"))
      states.append(tuple(dataclasses.replace(m, path=m.path[len("state/"):])
                          for m in g.members if m.path.startswith("state/")))
      groups.append(UnitGroup(g.units, mine))
    return Units(tuple(groups), tuple(states))
  if not callable(model):
    raise ValueError(f"find_units takes a Flax module or a function (params, *example) -> "
                     f"outputs, got {type(model).__name__}.")
  return Units(tuple(_coupling.unit_groups(model, params, *example)))


def _as_units(units: Any) -> Units:
  if isinstance(units, Units):
    return units
  if isinstance(units, UnitGroup):
    return Units((units,))
  if isinstance(units, Sequence) and all(isinstance(g, UnitGroup) for g in units):
    return Units(tuple(units))
  raise ValueError("prune_units needs units=vj.find_units(model, params, x) (or a list of "
                   f"vj.UnitGroup you declare), got {type(units).__name__}.")


def _check(units: Units, params: Any) -> None:
  flat = dict(_paths.leaf_paths(params))
  seen = {}
  for i, g in enumerate(units.groups):
    if not g.members:
      raise ValueError(f"unit group {i} has no member in the params.")
    for m in g.members:
      if m.path not in flat:
        raise ValueError(f"unit group {i}: {m.path!r} is not a param leaf; the params "
                         f"have {', '.join(list(flat)[:8])} ...")
      shape = np.shape(flat[m.path])
      size = g.units * m.block * m.repeat
      if not 0 <= m.axis < len(shape) or shape[m.axis] != size:
        raise ValueError(f"unit group {i}: {m.path!r} {tuple(shape)} has no axis {m.axis} "
                         f"of {g.units} units x {m.block} x {m.repeat} = {size} entries.")
      if (m.path, m.axis) in seen:
        raise ValueError(f"{m.path!r} axis {m.axis} is in unit groups {seen[m.path, m.axis]}"
                         f" and {i}; a leaf axis belongs to one group (merge them).")
      seen[m.path, m.axis] = i


def unit_rows(w: Any, m: Member, units: int) -> Any:
  """``w`` (a jax or numpy array) as ``(units, everything else)``: one row per unit."""
  xp = jnp if isinstance(w, jax.Array) else np
  x = xp.moveaxis(w, m.axis, 0).reshape(m.repeat, units, m.block, -1)
  return xp.swapaxes(x, 0, 1).reshape(units, -1)


def _expand(keep: jax.Array, m: Member, shape) -> jax.Array:
  """A unit mask ``(units,)`` broadcast to a member leaf's ``shape``."""
  per_entry = jnp.tile(jnp.repeat(keep, m.block), m.repeat)
  return per_entry.reshape([-1 if d == m.axis else 1 for d in range(len(shape))])


def unit_masks(units: Units, flat: dict[str, Any], fraction: Any) -> list[jax.Array]:
  """The ``(units,)`` keep masks of every group: ``units - round(fraction * units)`` units
  with the largest L2 norm over all their coupled slices kept (ties by index). ``flat``:
  the params by path (``dict(_paths.leaf_paths(params))``)."""
  masks = []
  for g in units.groups:
    score = jnp.zeros((g.units,), jnp.float32)
    for m in g.members:
      w = lax.stop_gradient(flat[m.path]).astype(jnp.float32)
      score = score + jnp.sum(jnp.square(unit_rows(w, m, g.units)), axis=1)
    if isinstance(fraction, (int, float)):
      k = g.units - int(round(fraction * g.units))
    else:
      k = g.units - jnp.round(jnp.asarray(fraction, jnp.float32) * g.units).astype(jnp.int32)
    masks.append(topk_mask(score[None, :], k)[0])
  return masks


def _awaiting_trace(fraction: Any) -> Transform:
  """``prune_units`` without ``units``: its groups come from the trace of the step
  (``make_train_step(example=)``, ``wrap_optax(apply_fn=, params=, example=)``); without
  one, ``init`` refuses in one line."""

  def init(params):
    raise ValueError("prune_units: no unit groups; pass example= (make_train_step(..., "
                     "example=x), or wrap_optax(..., apply_fn=, params=, example=)) so a "
                     "trace finds them, or units=vj.find_units(model, params, x).")

  def reselect(found):
    source = getattr(found, "source", None)
    return None if source is None else prune_units(fraction, units=find_units(*source))

  return Transform(init, lambda params, state, beta, count=0, *, exact=False: params,
                   lambda params, state, count: state, lambda path, leaf: False,
                   lambda path, leaf, state, count=0: (), reselect)


def prune_units(fraction: float | Callable, *, units: Any = None) -> Transform:
  r"""Removes ``fraction`` of the units of every coupled group, with a straight-through
  gradient.

  .. math:: C(W)_\ell = W_\ell \odot M_\ell, \quad \partial C / \partial W := I

  where, in each group, the mask keeps the units with the largest L2 norm over all their
  coupled slices (every member leaf), recomputed at every step, and ``M_\ell`` broadcasts
  it along each member's unit axis. An MLP hidden unit is removed from the producer's
  output column, its bias, the norms on the way and the consumer's input row together; an
  attention head from its query, key and value slices and its rows of the output
  projection (with grouped-query attention, a key / value head with its query group); a
  channel through BatchNorm.

  Args:
    fraction: share of each group's units removed, in ``[0, 1)`` (``round(fraction *
      units)`` per group), or a schedule ``count -> fraction`` for gradual removal.
    units: the groups: ``vj.find_units(model, params, x)`` (narrow it with
      ``.where(regex)``), or a list of :class:`vcon_jax.UnitGroup` you declare;
      ``None`` (default): the groups the step's trace finds (``make_train_step(...,
      example=x)`` or ``wrap_optax(..., apply_fn=, params=, example=)``), refused at
      ``init`` when there is no trace.

  >>> import vcon_jax as vj
  >>> group = vj.UnitGroup(4, (vj.Member("a/kernel", 1, 1), vj.Member("b/kernel", 0, 1)))
  >>> t = vj.prune_units(0.5, units=[group])
  """
  fraction = _validate.fraction_or_schedule("fraction", fraction)
  if units is None:
    return _awaiting_trace(fraction)
  units = _as_units(units)
  if not units.groups:
    raise ValueError("prune_units got no unit group: find_units found no removable units "
                     "(print it to see why none qualified), or declare vj.UnitGroup(...).")
  members = {m.path for g in units.groups for m in g.members}

  def select(path, leaf):
    return path in members

  def at(count):
    return fraction(count) if callable(fraction) else fraction

  def leaf_masks(params, count):
    """Per member leaf: the product of its groups' masks, broadcast to its shape."""
    flat = dict(_paths.leaf_paths(params))
    out = {}
    for g, keep in zip(units.groups, unit_masks(units, flat, at(count))):
      for m in g.members:
        mask = _expand(keep, m, np.shape(flat[m.path]))
        out[m.path] = mask if m.path not in out else out[m.path] & mask
    return out

  def init(params):
    _check(units, params)
    return TransformState({}, {})

  def apply(params, state, beta, count=0, *, exact=False):
    masks = leaf_masks(params, count)

    def one(path, leaf):
      p = _paths.path_str(path)
      if p not in masks:
        return leaf
      w = rounded(leaf)
      c = jnp.where(masks[p], lax.stop_gradient(w), jnp.zeros_like(w))
      return blend_leaf(w, c, beta, exact=exact)
    return jax.tree_util.tree_map_with_path(one, params)

  def refresh(params, state, count):
    return state

  def describe(path, leaf, state, count=0):
    if path not in members:
      return ()
    return (LeafSpec("prune_units", sparsity=float(at(count)), granularity="unit"),)

  return Transform(init, apply, refresh, select, describe)
