"""``init_from``: the target model started from weights trained elsewhere, not pretrained.

The weights are an ``.npz`` of the model's params keyed by ``/``-joined paths
(``blocks/0/attn/query/kernel``) or an Orbax checkpoint directory of the params tree.
Every leaf must match by path and shape, except a classifier's head (its registry entry's
``heads``), which is left fresh when its shape differs (a pretrained network on a new
task: another class count).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcon_jax import _paths as vj_paths
from vcon_experiments import model_registry, models, training
from vcon_experiments.config import Config


def load_params_file(path: str) -> dict[str, np.ndarray]:
  """``{"/"-joined path: array}`` from an ``.npz`` or an Orbax checkpoint of params."""
  path = pathlib.Path(path)
  if path.is_file():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree = ocp.StandardCheckpointer().restore(path.resolve())
  return {p: np.asarray(v) for p, v in vj_paths.leaf_paths(tree)}


def load(cfg: Config, seed: int) -> tuple[nnx.Module, Any]:
  """The target model (initialised with ``seed``) with the weights of ``cfg.init_from``
  (a fresh head if its shape differs); any other missing or misshapen leaf is an error
  naming it."""
  model = models.build_model(cfg, seed=seed)
  spec = model_registry.REGISTRY[cfg.model]
  heads = spec.heads if spec.classifier else ()
  plain = training.plain_step(model)
  fresh = plain.init().params
  loaded = load_params_file(cfg.init_from)
  used = set()

  def take(path, leaf):
    name = vj_paths.path_str(path)
    if name not in loaded:
      raise ValueError(f"init_from={cfg.init_from!r} has no leaf {name!r} (shape "
                       f"{tuple(leaf.shape)}); it holds e.g. {sorted(loaded)[:3]}.")
    value = loaded[name]
    used.add(name)
    if value.shape != leaf.shape:
      if name.split("/")[0] in heads:
        return leaf  # a pretrained network on a new task: a fresh head
      raise ValueError(f"init_from={cfg.init_from!r}: leaf {name!r} has shape "
                       f"{value.shape}, the model needs {tuple(leaf.shape)}.")
    return jnp.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(take, fresh)
  plain.update_model(plain.init(params), compressed=False)
  return model, params
