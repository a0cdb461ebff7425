"""Parameter paths, which leaves are compressed, and which axes of a kernel are inputs.

A leaf's path is its pytree keys joined by ``/``: ``Dense_0/kernel`` in a Linen params
tree, ``layers/0/kernel`` in an NNX state (an NNX ``.value`` accessor is dropped).
Selection patterns are matched with ``re.search`` against that string.

What is selected by default is decided by what a leaf *is*, not by its number of axes:
the ``kernel`` of a linear map or convolution (Flax's name for it in ``Dense``, ``Conv``,
``DenseGeneral``, ``Einsum``, ``nnx.Linear``, ``nnx.LinearGeneral``, ...) with at least
two axes. Biases (also the 2-D ``(heads, head_dim)`` attention biases), norm scales and
lookup tables are never selected unless asked for.

A kernel's input axes decide what "neuron", n:m groups, per-channel scales and low-rank
factors mean: the kernel is viewed as the ``(prod(input axes), prod(output axes))`` matrix
of the linear map it holds. See :func:`input_axes` for how they are found.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

#: Lookup tables, left dense by default: a kernel is not selected when one WHOLE segment of
#: its path (case-insensitive) is one of these names: embedding tables, position tables and
#: class / distillation / mask tokens (tables stored as ``embedding`` or ``pos_embedding``
#: leaves are not kernels anyway; this also keeps e.g. a ``Dense`` named ``embed`` dense).
#: Whole segments only: ``patch_embedding/kernel`` (a convolution),
#: ``TimestepEmbedder/Dense_0/kernel`` and ``PositionwiseFeedForward_0/Dense_0/kernel`` are
#: kernels and are selected. Applied under every option.
DEFAULT_EXCLUDE = (
    r"(?i)(^|/)(embed|embeds|embedding|embeddings|embedder|wte|wpe|"
    r"pos_embed|pos_embeds|pos_embedding|pos_embeddings|pos_emb|posemb|"
    r"position_embedding|position_embeddings|positional_embedding|positional_embeddings|"
    r"cls_token|class_token|dist_token|mask_token)(/|$)")

#: An untied output projection by name (a whole path segment): without a trace, a leaf
#: under it is the model's output layer, kept dense as LLM quantisers keep it (a trace
#: finds the output layer whatever its name); ``vj.Selection(outputs=...)`` opts it in.
OUTPUT_NAMES = r"(?i)(^|/)lm_head(/|$)"

#: Leaf names of linear-map and convolution kernels (Flax Linen and NNX).
KERNEL_NAMES = ("kernel",)

_ATTENTION_IN = ("query", "key", "value")  # Flax MHA q/k/v: (in, heads, head_dim)
_ATTENTION_OUT = ("out",)  # Flax MHA output: (heads, head_dim, out)
_LINEN_EINSUM = re.compile(r"^Einsum_\d+$")
_CONV = re.compile(r"(?i)conv")

InAxes = Mapping[str, "int | Sequence[int]"] | None


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


def is_floating(leaf: Any) -> bool:
  """Whether ``leaf`` has a floating (or complex) dtype; only those are compressed."""
  dtype = getattr(leaf, "dtype", None)
  # jnp's issubdtype knows bfloat16 and the other ml_dtypes floats; numpy's does not.
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


# ------------------------------------------------------------------------- input axes
def compile_in_axes(in_axes: InAxes) -> list[tuple[re.Pattern, Any]]:
  """Validates ``in_axes={regex: n or (axis, ...)}``; returns ``[(pattern, spec)]``."""
  if in_axes is None:
    return []
  if not isinstance(in_axes, Mapping):
    raise ValueError(f"in_axes must be a dict {{path regex: number of leading input axes "
                     f"or tuple of input axes}} or None, got {in_axes!r}.")
  out = []
  for pattern, spec in in_axes.items():
    compiled = compile_pattern("in_axes key", pattern)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, (bool, np.bool_)):
      spec = int(spec)
      if spec < 0:
        raise ValueError(f"in_axes[{pattern!r}] must be >= 0, got {spec}.")
    elif (isinstance(spec, (tuple, list)) and all(
        isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))
        for a in spec)):
      spec = tuple(int(a) for a in spec)
    else:
      raise ValueError(f"in_axes[{pattern!r}] must be the number of leading input axes (an "
                       f"int) or a tuple of input axis indices, got {spec!r}.")
    out.append((compiled, spec))
  return out


def compile_stacked(stacked: Mapping[str, int] | None) -> list[tuple[re.Pattern, int]]:
  """Validates ``stacked={path regex: number of leading stack axes}``."""
  if stacked is None:
    return []
  if not isinstance(stacked, Mapping):
    raise ValueError(f"stacked must be a dict {{path regex: number of leading axes that "
                     f"index the layers of a stack}} or None, got {stacked!r}.")
  out = []
  for pattern, k in stacked.items():
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"stacked[{pattern!r}] must be an integer >= 1 (the leading axes "
                       f"that index the layers), got {k!r}.")
    out.append((compile_pattern("stacked key", pattern), int(k)))
  return out


def stack_depth(path: str, compiled: list[tuple[re.Pattern, int]]) -> int:
  """Leading stack axes of ``path`` (the first matching declaration), else 0."""
  return next((k for pattern, k in compiled if pattern.search(path)), 0)


def _declared(path: str, shape: tuple, spec: Any) -> tuple[int, ...]:
  ndim = len(shape)
  axes = tuple(range(spec)) if isinstance(spec, int) else tuple(
      a % ndim if -ndim <= a < ndim else a for a in spec)
  if any(not 0 <= a < ndim for a in axes) or len(set(axes)) != len(axes):
    raise ValueError(f"in_axes for {path} (shape {tuple(shape)}) gives input axes {spec!r}, "
                     f"which are not distinct axes of a {ndim}-D leaf.")
  if ndim >= 2 and not 1 <= len(axes) <= ndim - 1:
    raise ValueError(f"in_axes for {path} (shape {tuple(shape)}) must leave at least one "
                     f"input and one output axis, got {spec!r}.")
  return tuple(sorted(axes))


def _ambiguous(path: str, shape: tuple, why: str) -> ValueError:
  return ValueError(
      f"cannot tell which axes of {path} (shape {tuple(shape)}) are the inputs of its "
      f"linear map: {why}. Pass example= (make_train_step(..., example=x), or "
      f"wrap_optax(..., apply_fn=, params=, example=)) so a trace of the model tells, or "
      f"declare them with vj.Selection(in_axes={{{path!r}: (axis, ...)}}).")


def input_axes(path: str, shape: Sequence[int], declared: Sequence = ()) -> tuple[int, ...]:
  """The input axes of the linear map a leaf holds; the other axes are its outputs.

  In order: the first ``declared`` pattern (from :func:`compile_in_axes`) that matches
  ``path``; then what Flax's layout and names say:

  - 0-D and 1-D leaves: no input axis (a 1-D leaf is ``(1, n)``);
  - a kernel under a Linen ``Einsum_<i>`` module: any layout is possible, so refused;
  - a leaf not named ``kernel`` (opted in with ``include_non_kernels``) of 2 or more
    axes: refused (Equinox's and PyTorch-style weights are ``(out, in)``): declare its
    axes or let a trace find them;
  - 2-D: ``(in, out)`` (``Dense``, ``nnx.Linear``; an ``nnx.Einsum``, whose attribute name
    does not say it is one, with an ``(out, in)`` kernel must be declared);
  - 3-D kernels of Flax attention (``nn.MultiHeadDotProductAttention``,
    ``nnx.MultiHeadAttention``): ``query`` / ``key`` / ``value`` are
    ``(in, heads, head_dim)`` (one input axis), ``out`` is ``(heads, head_dim, out)``
    (two input axes);
  - a path with a segment containing ``conv`` (``Conv_0``, ``convs/2``, ``conv1``): a
    convolution ``(spatial..., in, out)``, every axis but the last is an input;
  - anything else (a ``DenseGeneral`` / ``LinearGeneral`` kernel, which may be
    ``(in, in, out)`` or ``(in, out, out)``, a convolution not named so, a scanned stack):
    refused with a ``ValueError`` that says how to declare it, never guessed.

  Args:
    path: the leaf's ``/``-joined path.
    shape: its shape.
    declared: compiled ``in_axes`` declarations.

  Returns:
    The sorted input axes.
  """
  shape = tuple(shape)
  ndim = len(shape)
  for pattern, spec in declared:
    if pattern.search(path):
      return _declared(path, shape, spec)
  if ndim <= 1:
    return ()
  segments = path.split("/")
  modules = segments[:-1]
  parent = modules[-1] if modules else ""
  if path.rsplit("/", 1)[-1] not in KERNEL_NAMES:  # an opted-in non-kernel leaf
    # (in, out) is Flax's layout only: Equinox, PyTorch-style and Llama weights are
    # (out, in), Gemma's einsum weights any; the names cannot say which, so never guess
    raise _ambiguous(path, shape, "it is not a Flax kernel (Equinox and PyTorch-style "
                     "weights are (out, in))")
  if any(_LINEN_EINSUM.match(s) for s in modules):
    raise _ambiguous(path, shape, "it belongs to an Einsum, whose kernel may have any layout")
  if ndim == 2:
    return (0,)
  if ndim == 3 and parent in _ATTENTION_IN:
    return (0,)
  if ndim == 3 and parent in _ATTENTION_OUT:
    return (0, 1)
  if parent in _ATTENTION_IN + _ATTENTION_OUT:  # 4 or more axes: a scanned stack of them
    raise _ambiguous(path, shape, "an attention projection of more than 3 axes is a stack "
                     "of layers (nn.scan) or a layout Flax's attention does not have")
  if any(_CONV.search(s) for s in modules):
    return tuple(range(ndim - 1))
  raise _ambiguous(path, shape, "a multi-axis kernel that is neither a Flax attention "
                   "projection nor a convolution may have several input or output axes")


def _axes(ndim: int, in_axes: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  if in_axes is None:  # the legacy layout: every axis but the last is an input
    ins = tuple(range(ndim - 1)) if ndim >= 1 else ()
  else:
    ins = tuple(in_axes)
  outs = tuple(a for a in range(ndim) if a not in ins)
  return ins, outs


def matricize_shape(shape: tuple[int, ...],
                    in_axes: Sequence[int] | None = None) -> tuple[int, int]:
  """Kernel shape -> ``(fan_in, fan_out)``.

  ``in_axes`` (from :func:`input_axes`) are the input axes; ``None``: all axes but the last
  (Flax's ``Dense`` / ``Conv`` layout). A 1-D shape is ``(1, n)``.
  """
  ins, outs = _axes(len(shape), in_axes)
  return (math.prod(shape[a] for a in ins), math.prod(shape[a] for a in outs))


def to_matrix(x: Any, in_axes: Sequence[int] | None = None) -> Any:
  """``x`` (numpy or jax) as its ``(fan_in, fan_out)`` matrix: input axes first."""
  ins, outs = _axes(x.ndim, in_axes)
  perm = ins + outs
  if perm != tuple(range(x.ndim)):
    x = x.transpose(perm)
  n = len(ins)
  return x.reshape(math.prod(x.shape[:n]), math.prod(x.shape[n:]))


def from_matrix(mat: Any, shape: Sequence[int], in_axes: Sequence[int] | None = None) -> Any:
  """Inverse of :func:`to_matrix`: a ``(fan_in, fan_out)`` matrix back to ``shape``."""
  shape = tuple(shape)
  ins, outs = _axes(len(shape), in_axes)
  perm = ins + outs
  x = mat.reshape(tuple(shape[a] for a in perm))
  if perm != tuple(range(len(shape))):
    x = x.transpose(tuple(int(a) for a in np.argsort(perm)))
  return x
