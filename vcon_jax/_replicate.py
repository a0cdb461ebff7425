"""Copies of a pytree on every device, for a ``jax.pmap`` training loop."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """Stacks one copy of every leaf per device along a new leading axis, one per device.

  The input of ``jax.pmap(step, axis_name=...)``: ``state = vj.replicate(step.init(p))``.
  Each device receives its own copy directly (no stacked array is built on one device).

  Args:
    tree: a pytree of arrays, e.g. a :class:`TrainState`.
    devices: the devices (default ``jax.local_devices()``), in ``jax.pmap``'s order.

  >>> import jax, vcon_jax as vj
  >>> vj.replicate({"w": jax.numpy.ones(3)})["w"].shape == (jax.local_device_count(), 3)
  True
  """
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)), P("devices"))

  def put(x):
    x = jax.numpy.asarray(x)
    copies = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding,
                                                    copies)

  return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
  """The first copy of a replicated pytree (the leading device axis dropped).

  ``step.compressed_params(vj.unreplicate(state))`` after a ``jax.pmap`` loop.
  """
  return jax.tree.map(lambda x: x[0], tree)
