"""``vj.shrink``: from a model whose removed units are zero to a physically smaller one.

A unit is removed when every one of its param slices is zero (what
:func:`vcon_jax.prune_units` gives at ``beta = 0``). Removing such a unit is exact
whatever the model does with it, since its consumer rows are zero: the shrunk model
computes what the masked model computes, with smaller matrices. Every member leaf loses
the unit's slice, BatchNorm statistics included; for an NNX module the layers' size
attributes (``in_features``, ``out_features``, ``num_features``) are set from the new
shapes, and with ``example=`` the shrunk model's outputs are checked against the masked
model's before anything is returned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from vcon_jax import _model, _paths, _schedules, _train, _transform
from vcon_jax.export import writer
from vcon_jax._units import Units, _as_units, unit_rows

_SIZE_ATTRS = ("in_features", "out_features", "num_features")


@dataclasses.dataclass
class Shrunk:
  """What :func:`shrink` gives: the smaller ``params`` and ``model_state`` (plain dicts;
  for an NNX module also written into it, ``module``), and per unit group its width
  before and after (``widths``: ``(old, new)``) and the indices kept."""

  params: Any
  model_state: Any
  widths: list[tuple[int, int]]
  kept: list[np.ndarray]
  units: Units
  module: Any = None

  def export(self, path, model: Any = None):
    """Writes the shrunk model as a compact export (:func:`vcon_jax.export`): the
    smaller shapes are what is stored, and :func:`vcon_jax.load_compressed` runs it with
    the NNX module (``shrunk.module``) or, for Linen, the model built with the new widths
    (``model=``, required then). Returns the export's :class:`~vcon_jax.Summary`."""
    target = self.module if self.module is not None else model
    if target is None:
      raise ValueError("Shrunk.export needs model=<the Linen model built with the new "
                       f"widths {[w for _, w in self.widths]}>.")
    step = _train.make_train_step(target, _transform.identity(), _schedules.constant(1.0))
    params = None if self.module is not None else {"params": self.params,
                                                   **(self.model_state or {})}
    return writer.export(step, step.init(params), path)

  def __str__(self):
    rows = []
    for i, ((old, new), g) in enumerate(zip(self.widths, self.units.groups)):
      where = ", ".join(sorted({m.path.rsplit("/", 1)[0] for m in g.members}))
      rows.append(f"group {i}: {old} -> {new} units ({where})")
    return "\n".join(rows)


def _kept(units: Units, flat: dict) -> list[np.ndarray]:
  kept = []
  for g in units.groups:
    alive = np.zeros(g.units, bool)
    for m in g.members:
      alive |= np.any(unit_rows(np.asarray(flat[m.path], np.float32), m, g.units) != 0, axis=1)
    if not alive.any():  # keep one: a layer of width 0 is not a model
      alive[0] = True
    kept.append(np.flatnonzero(alive))
  return kept


def _slice(tree: Any, members, kept_by_member) -> Any:
  """``tree`` with each member leaf cut down to its kept units (a new tree);
  ``members``: ``(Member, units)`` pairs."""
  flat = dict(_paths.leaf_paths(tree))
  for (m, units), idx in zip(members, kept_by_member):
    entries = m.entries(idx, units)
    flat[m.path] = jax.numpy.take(jax.numpy.asarray(flat[m.path]), entries, axis=m.axis)
  return jax.tree_util.tree_map_with_path(lambda p, x: flat[_paths.path_str(p)], tree)


def shrink(model: Any, units: Any, params: Any = None, model_state: Any = None, *,
           example: Any = None, rebuilt: Any = None, atol: float = 1e-4) -> Shrunk:
  """Removes the zeroed units of ``units`` (from :func:`vcon_jax.find_units`).

  Args:
    model: an NNX module holding the compressed weights (after ``step.update_model``), a
      Linen module, or ``None`` with plain ``params``.
    units: the groups the model was pruned with.
    params: for Linen (or ``None`` model), the compressed params (``beta = 0``:
      ``step.compressed_params(state)``); ignored for NNX.
    model_state: Linen's other collections (``{'batch_stats': ...}``), if any.
    example: an input batch; when given, the shrunk model is run on it and its outputs
      must equal the masked model's to ``atol`` (a model that reads a width from an
      attribute we cannot set fails here, not later). For Linen this needs ``rebuilt``.
    rebuilt: for Linen, the model built with the new widths (checked with ``example``).

  Returns:
    :class:`Shrunk`. For Linen, rebuild the model with the new widths (``print`` it) and
    apply it to ``shrunk.params``.
  """
  units = _as_units(units)
  is_nnx = isinstance(model, nnx.Module)
  if example is not None and not is_nnx and rebuilt is None:
    raise ValueError("shrink(example=...) checks a Linen model only with rebuilt=<the "
                     "model built with the new widths>: Linen fixes a layer's width in its "
                     "attributes.")
  if is_nnx:
    params = nnx.state(model, nnx.Param).to_pure_dict()
    model_state = nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()
  elif params is None:
    raise ValueError("shrink needs the compressed params for a Linen model (or plain "
                     "params): shrink(model, units, step.compressed_params(state)).")
  elif isinstance(params, dict) and "params" in params:
    params, model_state = params["params"], {k: v for k, v in params.items() if k != "params"}
  flat = dict(_paths.leaf_paths(params))
  kept = _kept(units, flat)
  masked_out = _run(model, params, model_state, example, is_nnx) if example is not None \
      and model is not None else None
  members = [(m, g.units) for g in units.groups for m in g.members]
  by_member = [k for g, k in zip(units.groups, kept) for _ in g.members]
  new_params = _slice(params, members, by_member)
  new_state = model_state
  if units.state_members:
    sm = [(m, g.units) for g, ms in zip(units.groups, units.state_members) for m in ms]
    sk = [k for ms, k in zip(units.state_members, kept) for _ in ms]
    if sm:
      new_state = _slice(model_state, sm, sk)
  widths = [(g.units, len(k)) for g, k in zip(units.groups, kept)]
  out = Shrunk(new_params, new_state, widths, kept, units)
  if is_nnx:
    _write_nnx(model, new_params, new_state if units.state_members else None)
    out.module = model
  if masked_out is not None:
    got = _run(model if is_nnx else rebuilt, new_params, new_state, example, is_nnx)
    err = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(masked_out)))
    if not err <= atol:
      raise ValueError(f"the shrunk model's outputs differ from the masked model's by "
                       f"{err:.3g} (> atol={atol}): the model reads a width from somewhere "
                       f"shrink cannot change (an attribute, a config); derive it from the "
                       f"weights' shapes, or rebuild the model with the new widths.")
  return out


def _run(model, params, model_state, example, is_nnx):
  """The model's outputs on ``example`` in evaluation mode (an NNX module: a copy of it,
  so the user's module keeps its mode)."""
  if is_nnx:
    m = nnx.clone(model)
    m.eval()
    return m(example)
  adapter = _model.make_adapter(model, None, None)
  return adapter.apply(params, dict(model_state or {}), example, None, False)[0]


def _write_nnx(module, params, state) -> None:
  p = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(p, params)
  if state is not None:
    rest = nnx.state(module, nnx.Not(nnx.Param))
    nnx.replace_by_pure_dict(rest, state)
    nnx.update(module, rest)
  nnx.update(module, p)
  for _, sub in nnx.iter_modules(module):
    kernel = getattr(sub, "kernel", None)
    shape = getattr(kernel, "shape", None) if kernel is not None else None
    if shape is not None and len(shape) >= 2:
      if isinstance(getattr(sub, "in_features", None), int):
        sub.in_features = int(shape[-2])
      if isinstance(getattr(sub, "out_features", None), int):
        sub.out_features = int(shape[-1])
    scale = getattr(sub, "scale", None)
    if isinstance(getattr(sub, "num_features", None), int) and scale is not None:
      sub.num_features = int(scale.shape[-1])
