"""Where the VCON state lives: every array placed like the parameter it belongs to.

The user places the params (replicated, FSDP or tensor parallel, with ``NamedSharding``);
the dense copy, masks, low-rank factors and optimiser moments follow them, and the jitted
step keeps those placements (``jax.jit`` with shardings: the partitioner inserts the
collectives). Only meshes with ``Auto`` axes are supported: under ``Explicit`` axes (the
default of ``jax.make_mesh`` in recent JAX) every reshape of a split kernel, e.g. the
per-layer top-k of pruning, would need an explicit output sharding.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def auto_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis ``Auto`` (the same devices and names)."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def data_mesh(devices=None) -> Mesh:
  """All (or the given) devices on one ``'data'`` axis, ``Auto``."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(AxisType.Auto,))


def named_sharding(x: Any) -> NamedSharding | None:
  """The ``NamedSharding`` of a concrete array (``None`` for tracers and other leaves)."""
  if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
    return None
  sharding = x.sharding
  if not isinstance(sharding, NamedSharding):
    return None
  if any(t == AxisType.Explicit for t in sharding.mesh.axis_types) and sharding.spec != P():
    raise ValueError(
        f"a parameter is split over a mesh with Explicit axes ({sharding.spec}); vcon_jax "
        f"needs Auto axes: jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType."
        f"Auto,) * len(names)).")
  return sharding


def like_param(leaf: Any, param: Any, sharding: NamedSharding | None) -> Any:
  """Places a transform-state ``leaf`` owned by ``param`` (sharded as ``sharding``).

  Same shape: the same sharding (masks). A ``(fan_in, r)`` or ``(r, fan_out)`` low-rank
  factor of a 2-D kernel takes the kernel's input or output axis split. Anything else is
  replicated over the kernel's mesh. New specs are spelled without trailing ``None``, as
  ``jax.jit`` spells its outputs.
  """
  if sharding is None or not hasattr(leaf, "shape"):
    return leaf
  spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
  if tuple(leaf.shape) == tuple(param.shape):
    axes = spec
  else:
    axes = [None] * leaf.ndim
    if leaf.ndim == 2 and param.ndim == 2:
      if leaf.shape[0] == param.shape[0]:
        axes[0] = spec[0]
      if leaf.shape[1] == param.shape[1]:
        axes[1] = spec[1]
  axes = list(axes)
  while axes and axes[-1] is None:  # the spelling jit gives its outputs: no recompile
    axes.pop()
  return jax.device_put(leaf, NamedSharding(sharding.mesh, P(*axes)))


def params_mesh(params: Any) -> Mesh | None:
  """The one mesh the params are placed on with ``NamedSharding`` (``None``: none, or several)."""
  meshes = {s.mesh for s in shardings_of(params) if s is not None}
  return next(iter(meshes)) if len(meshes) == 1 else None


def replicate_unplaced(tree: Any, mesh: Mesh | None) -> Any:
  """Concrete leaves without a ``NamedSharding`` (step counts, scalars) replicated on ``mesh``.

  Left on one device they would be placed on the mesh by the first jitted step, whose
  output the next call would see with a new sharding and compile the step again.
  """
  if mesh is None:
    return tree
  replicated = NamedSharding(mesh, P())

  def one(x):
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
      return x
    return x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated)
  return jax.tree.map(one, tree)


def shardings_of(tree: Any) -> tuple:
  """Per-leaf ``NamedSharding`` (or ``None``) of ``tree``, in flattening order."""
  return tuple(named_sharding(x) for x in jax.tree.leaves(tree))


def constrain(tree: Any, shardings: tuple | None) -> Any:
  """``with_sharding_constraint`` of every leaf that has a recorded sharding."""
  if not shardings:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  if len(leaves) != len(shardings):
    return tree
  leaves = [x if s is None else jax.lax.with_sharding_constraint(x, s)
            for x, s in zip(leaves, shardings)]
  return jax.tree.unflatten(treedef, leaves)


def place(tree: Any, shardings: tuple | None) -> Any:
  """``device_put`` of every concrete leaf that has a recorded sharding (eager)."""
  if not shardings:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [x if s is None or isinstance(x, jax.core.Tracer) else jax.device_put(x, s)
            for x, s in zip(leaves, shardings)]
  return jax.tree.unflatten(treedef, leaves)
