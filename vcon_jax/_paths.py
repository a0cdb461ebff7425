"""Parameter paths and leaf selection by regular expression.

A leaf's path is its pytree keys joined by ``/``, e.g. ``params/Dense_0/kernel`` for a
Linen model or ``layers/0/kernel`` for an NNX model. Selection patterns are matched with
``re.search`` against that string.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax

# Leaves that hold lookup tables rather than linear maps: embeddings, class tokens and
# position tables are left dense by default even though they have ndim >= 2.
DEFAULT_EXCLUDE = r"(?i)(embed|cls_token|class_token|pos_emb|position)"


def path_keys(path: tuple) -> list:
  """Pytree path -> its plain keys: dict keys, attribute names, sequence indices.

  The one path helper (selection, checkpoint leaf names, export manifests). Integer keys
  stay ``int`` (NNX list indices), others become ``str``.

  >>> import jax
  >>> path_keys(jax.tree_util.tree_flatten_with_path({"layers": [0, {"w": 1}]})[0][1][0])
  ['layers', 1, 'w']
  """
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    out.append(k if isinstance(k, int) else str(k))
  return out


def path_str(path: tuple) -> str:
  """Joins pytree path keys with ``/`` (an NNX ``.value`` accessor is dropped)."""
  parts = [str(k) for k in path_keys(path)]
  if parts and parts[-1] == "value":
    parts = parts[:-1]
  return "/".join(parts)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
  """Returns ``(path, leaf)`` pairs of ``tree`` in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in flat]


def compile_pattern(name: str, pattern: str | None) -> re.Pattern | None:
  """Compiles a user regex, turning a syntax error into a clear ``ValueError``."""
  if pattern is None:
    return None
  if not isinstance(pattern, str):
    raise ValueError(f"{name} must be a regular expression string or None, got {pattern!r}.")
  try:
    return re.compile(pattern)
  except re.error as err:
    raise ValueError(f"{name}={pattern!r} is not a valid regular expression: {err}.") from None


def make_selector(where: str | None, exclude: str | None) -> Callable[[str, Any], bool]:
  """Builds ``select(path, leaf) -> bool``.

  Default (``where=None``): every leaf with ``ndim >= 2`` (dense, conv and attention
  kernels) except those matching :data:`DEFAULT_EXCLUDE`. With ``where``, leaves whose path
  matches it and that have ``ndim >= 1``. ``exclude`` always removes matches.
  """
  where_re = compile_pattern("where", where)
  exclude_re = compile_pattern("exclude", exclude)
  default_exclude = re.compile(DEFAULT_EXCLUDE)

  def select(path: str, leaf: Any) -> bool:
    ndim = getattr(leaf, "ndim", 0)
    if where_re is None:
      chosen = ndim >= 2 and not default_exclude.search(path)
    else:
      chosen = ndim >= 1 and bool(where_re.search(path))
    if chosen and exclude_re is not None and exclude_re.search(path):
      chosen = False
    return chosen

  return select


def matricize_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """Kernel shape -> (fan_in, fan_out): all axes but the last are inputs (Flax layout)."""
  if len(shape) == 1:
    return 1, shape[0]
  fan_in = 1
  for s in shape[:-1]:
    fan_in *= s
  return fan_in, shape[-1]
