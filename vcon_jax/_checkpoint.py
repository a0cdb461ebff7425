"""Saving and restoring the train state with Orbax.

The whole :class:`~vcon_jax.TrainState` is saved (params, optimiser state, transform state
including masks and low-rank factors, model state, step and rng), so beta and every
counter resume exactly where they stopped.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from vcon_jax import _paths


class CheckpointMismatchError(ValueError):
  """A checkpoint that is readable but saved for another model or transform (its leaves'
  names or shapes differ from the restore target's); older steps will not fit either."""


class CheckpointManager:
  """A thin wrapper of ``orbax.checkpoint.CheckpointManager`` for train states.

  >>> import tempfile, jax.numpy as jnp, vcon_jax as vj
  >>> mgr = vj.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2)
  >>> mgr.save(1, {"w": jnp.ones(2)})
  True
  >>> mgr.latest_step()
  1
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3,
               save_interval_steps: int = 1):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be an integer >= 1 or None, got {max_to_keep!r}.")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           save_interval_steps=save_interval_steps)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` under ``step`` and waits until it is on disk."""
    saved = self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)
    self._manager.wait_until_finished()
    return saved

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores into the structure, dtypes and shardings of ``target``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    self._check_shapes(step, abstract)
    return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract))

  def _check_shapes(self, step: int, abstract: Any) -> None:
    """Names the first leaf whose saved shape differs from the target's (or is missing)."""
    try:
      meta = ocp.StandardCheckpointer().metadata(
          os.path.join(self.directory, str(int(step)), "default"))
      meta = getattr(meta, "item_metadata", meta)
      saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(
          meta, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "name"))
               if hasattr(m, "shape")}
    except Exception:  # pylint: disable=broad-except
      return  # unreadable metadata: the restore itself reports (or a caller skips it)
    if not saved:
      return
    wanted = {".".join(map(str, _paths.path_keys(path))): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    diffs = [(name, saved.get(name), shape) for name, shape in wanted.items()
             if saved.get(name) != shape]
    if diffs and len(diffs) < len(wanted):  # name schemes differ entirely: let Orbax judge
      name, got, want = diffs[0]
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not fit this model/transform: "
          f"{len(diffs)} of {len(wanted)} leaves differ, the first is {name}: saved "
          f"{'nothing' if got is None else f'shape {got}'}, expected shape {want}.")

  def close(self) -> None:
    self._manager.close()


def save(state: Any, directory: str | os.PathLike, step: int | None = None, *,
         max_to_keep: int | None = None) -> None:
  """Saves a train state to ``directory`` (step defaults to ``state.step``).

  Other steps already in ``directory`` are kept unless ``max_to_keep`` is given, in which
  case only the newest ``max_to_keep`` steps remain (use :class:`CheckpointManager` to keep
  a rolling window during training).

  >>> import tempfile, jax.numpy as jnp, vcon_jax as vj
  >>> folder = tempfile.mkdtemp()
  >>> for step in range(5):
  ...   vj.save({"w": jnp.ones(2)}, folder, step=step)
  >>> vj.CheckpointManager(folder, max_to_keep=None).all_steps()
  [0, 1, 2, 3, 4]
  """
  if step is None:
    step = int(jax.device_get(state.step))
  mgr = CheckpointManager(directory, max_to_keep=max_to_keep)
  mgr.save(step, state, force=True)
  mgr.close()


def restore(directory: str | os.PathLike, target: Any, step: int | None = None) -> Any:
  """Restores the latest (or given) step of ``directory`` into ``target``'s structure."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {os.fspath(directory)!r} does not exist.")
  mgr = CheckpointManager(directory, max_to_keep=None)
  try:
    return mgr.restore(target, step)
  finally:
    mgr.close()
