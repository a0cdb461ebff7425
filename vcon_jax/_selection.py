"""Which leaves a transform compresses, and how each is read: one typed value.

A :class:`Selection` is what every transform factory takes (``selection=``). It is the
same object whether a user declares it or a trace of the model finds it
(:meth:`vcon_jax.Discovery.selection`); ``make_train_step(example=)`` and
``wrap_optax(apply_fn=, params=, example=)`` replace a transform's selection by the
traced one (:meth:`Selection.traced`), keeping the user's narrowing.

Two ways to decide, never a guess:

* **traced** (``leaves`` set): the linear maps the trace found, each with its input axes
  and its stack axes; lookup tables, tied embeddings, biases, norms and the model's
  output layer (the linear map whose result is the model's output) stay dense.
* **by names** (no trace): Flax's ``kernel`` leaves of a layout Flax's names settle (a
  2-D ``Dense`` kernel, a 3-D attention projection, a convolution). A leaf the names
  cannot settle (a float leaf of 2 or more axes not named ``kernel``, such as Gemma's
  einsum ``w`` or Equinox's ``(out, in)`` ``weight``; a multi-axis kernel that may be a
  scanned stack or a ``DenseGeneral``) is refused at ``init``, in one line that names
  ``example=`` first, unless the user declares it (``in_axes`` / ``stacked``).

Under every option, :data:`DEFAULT_EXCLUDE` (embedding and position tables, class tokens)
stays dense.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from vcon_jax import _paths

#: Names of leaves that are never a linear map's weight (a 2-D attention bias is
#: ``(heads, head_dim)``; Flax's ``nn.Embed`` stores ``embedding``): not refused, not taken.
NOT_WEIGHTS = ("bias", "scale", "embedding", "mean", "var")

_TRACE_HINT = ("pass example= (make_train_step(..., example=x), or wrap_optax(..., "
               "apply_fn=, params=, example=)) so a trace of the model tells")


@dataclasses.dataclass(frozen=True)
class Traced:
  """What a trace found for one linear map: its input axes and its stack axes (the
  leading axes that index the layers of a scanned stack)."""

  in_axes: tuple[int, ...]
  stack: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
  """Which leaves a transform compresses and how each is read.

  Attributes:
    where: keep only leaves whose ``/``-joined path matches (``re.search``).
    exclude: drop leaves whose path matches.
    in_axes: ``{path regex: n or (axis, ...)}``: declares a leaf a linear map with these
      input axes (its first ``n`` axes, or the listed ones, in the whole leaf's axes).
    stacked: ``{path regex: k}``: declares a leaf a stack of layers whose first ``k`` axes
      index the layers (``nn.scan``, ``nnx.scan``); each layer is compressed on its own.
    include_non_kernels: also take the leaves that are not linear maps (biases, norm
      scales; by names: any leaf not named ``kernel``) as whole tensors; never
      :data:`DEFAULT_EXCLUDE` nor the output layer.
    outputs: the model's output layer (traced; by names a leaf under ``lm_head``) stays
      dense; a regex naming output layers to compress anyway (opt in by name).
    leaves: set by a trace: ``{path: Traced}`` of the linear maps found; ``None`` selects
      by names.
    output_layers: set by a trace: the paths of the output layers (kept dense unless
      ``outputs`` names them).
    roles: set by a trace: what each leaf is, in words (``vj.summary``'s role column).
    unread: set by a trace: ``{path: ops}`` of the weights it could not read as one linear
      map (refused unless declared or excluded).

  >>> import vcon_jax as vj
  >>> t = vj.prune(0.5, selection=vj.Selection(exclude="head"))
  """

  where: str | None = None
  exclude: str | None = None
  in_axes: Mapping[str, Any] | None = None
  stacked: Mapping[str, int] | None = None
  include_non_kernels: bool = False
  outputs: str | None = None
  leaves: Mapping[str, Traced] | None = None
  output_layers: tuple[str, ...] = ()
  roles: Mapping[str, str] | None = dataclasses.field(default=None, repr=False)
  unread: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict,
                                                             repr=False)

  def __post_init__(self):
    _paths.compile_pattern("where", self.where)
    _paths.compile_pattern("exclude", self.exclude)
    _paths.compile_pattern("outputs", self.outputs)
    _paths.compile_in_axes(self.in_axes)
    _paths.compile_stacked(self.stacked)
    if not isinstance(self.include_non_kernels, bool):
      raise ValueError(f"include_non_kernels must be True or False, got "
                       f"{self.include_non_kernels!r}.")

  # ------------------------------------------------------------------- derived values
  @property
  def is_traced(self) -> bool:
    return self.leaves is not None

  def replace(self, **changes: Any) -> "Selection":
    return dataclasses.replace(self, **changes)

  def traced(self, found: Any) -> "Selection":
    """This selection on what a trace found (:class:`vcon_jax.Discovery`): the user's
    ``where`` / ``exclude`` / ``outputs`` narrowing and declarations are kept."""
    roles = {p: u.role() + (", output layer" if p in found.outputs else "")
             for p, u in found.leaves.items()}
    return self.replace(leaves=found.linear_maps(), output_layers=tuple(found.outputs),
                        roles=roles, unread=found.unread())

  # -------------------------------------------------------------------- the decision
  def resolver(self, name: str, needs_axes: bool) -> "Resolver":
    return Resolver(self, name, needs_axes)

  # Mapping protocol for one release: ``vj.prune(0.5, **found.selection())`` (0.3).
  def keys(self):
    return [k for k in ("where", "exclude", "in_axes", "stacked", "include_non_kernels")
            if self._legacy()[k] is not None]

  def __getitem__(self, key):
    return self._legacy()[key]

  def _legacy(self) -> dict:
    if not self.is_traced:
      return {"where": self.where, "exclude": self.exclude, "in_axes": self.in_axes,
              "stacked": self.stacked, "include_non_kernels": self.include_non_kernels}
    # the traced choice as the resolver makes it: narrowed, output layers left out
    resolver = self.resolver("selection", False)
    chosen = [p for p in self.leaves if resolver.narrowed(p) and not resolver.is_output(p)]
    stacks = {f"^{re.escape(p)}$": self.leaves[p].stack for p in chosen
              if self.leaves[p].stack}
    return {"where": "^(" + "|".join(re.escape(p) for p in chosen) + ")$",
            "exclude": self.exclude,
            "in_axes": {f"^{re.escape(p)}$": self.leaves[p].in_axes for p in chosen},
            "stacked": stacks or None, "include_non_kernels": True}


class Resolver:
  """A :class:`Selection` applied to leaves: ``plan(path, leaf)`` is ``None`` (not
  compressed) or ``(axes, stack)``: the input axes in the whole leaf's axes (``None``
  when the rule does not need them) and the number of leading stack axes. Refusals
  (``ValueError``) come from :meth:`check`, called at ``init``, before any jit."""

  def __init__(self, sel: Selection, name: str, needs_axes: bool):
    self.sel, self.name, self.needs_axes = sel, name, needs_axes
    self.where = _paths.compile_pattern("where", sel.where)
    self.exclude = _paths.compile_pattern("exclude", sel.exclude)
    self.outputs = _paths.compile_pattern("outputs", sel.outputs)
    self.declared = _paths.compile_in_axes(sel.in_axes)
    self.stacks = _paths.compile_stacked(sel.stacked)
    self.default_exclude = re.compile(_paths.DEFAULT_EXCLUDE)
    self.output_names = re.compile(_paths.OUTPUT_NAMES)
    self._cache: dict = {}

  def narrowed(self, path: str) -> bool:
    """Whether the user's narrowing and the default exclusions keep ``path``."""
    if self.default_exclude.search(path):
      return False
    if self.where is not None and not self.where.search(path):
      return False
    return not (self.exclude is not None and self.exclude.search(path))

  def is_output(self, path: str) -> bool:
    """An output layer (traced, or by name ``lm_head``) the user did not opt in."""
    output = (path in self.sel.output_layers if self.sel.is_traced
              else self.output_names.search(path) is not None)
    return output and not (self.outputs is not None and self.outputs.search(path))

  def select(self, path: str, leaf: Any) -> bool:
    return self.plan(path, leaf) is not None

  def plan(self, path: str, leaf: Any):
    key = (path, tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", "")))
    if key not in self._cache:
      try:
        self._cache[key] = self._decide(path, leaf)
      except ValueError as err:
        self._cache[key] = err
    out = self._cache[key]
    if isinstance(out, ValueError):
      raise out
    return out

  def check(self, params: Any) -> list[str]:
    """The selected paths; raises the first refusal (all refused leaves counted)."""
    chosen, refused = [], []
    leaves = _paths.leaf_paths(params)
    for path, leaf in leaves:
      try:
        if self.plan(path, leaf) is not None:
          chosen.append(path)
      except ValueError as err:
        refused.append(err)
    if not self.sel.is_traced:
      refused += self._attention_without_its_siblings(chosen, dict(leaves))
    if refused:
      more = f" ({len(refused) - 1} more leaves refused likewise)" if len(refused) > 1 else ""
      raise ValueError(f"{refused[0]}{more}")
    return chosen

  # ------------------------------------------------------------------------ internals
  def _decide(self, path: str, leaf: Any):
    if not _paths.is_floating(leaf) or getattr(leaf, "ndim", 0) < 1:
      return None
    if not self.narrowed(path) or self.is_output(path):
      return None
    shape = tuple(leaf.shape)
    ndim = len(shape)
    name = path.rsplit("/", 1)[-1]
    # a declaration names weights of 2 or more axes (its pattern may also match the
    # layer's bias, which it leaves alone)
    weighty = ndim >= 2 and name not in NOT_WEIGHTS
    declared_axes = next((s for p, s in self.declared if p.search(path)), None) \
        if weighty else None
    depth = _paths.stack_depth(path, self.stacks) if weighty else 0
    if not self.sel.is_traced:
      return self._by_names(path, shape, declared_axes, depth)
    found = self.sel.leaves.get(path)
    if found is not None:
      if declared_axes is None and not depth:
        return (found.in_axes if self.needs_axes else None), found.stack
      return self._declared(path, shape, declared_axes, depth or found.stack)
    if path in self.sel.unread:
      if declared_axes is not None or depth:
        return self._declared(path, shape, declared_axes, depth)
      return self._refuse(path, shape, f"the model uses it through "
                          f"{', '.join(self.sel.unread[path])}, not as one linear map",
                          traced=True)
    # a lookup table, a tied embedding, a bias or a norm scale: whole tensors on request
    if not self.sel.include_non_kernels or name in NOT_WEIGHTS and ndim >= 2 and \
        self.needs_axes:
      return None
    return self._whole(path, shape)

  def _whole(self, path, shape):
    """A leaf taken as a whole tensor (``include_non_kernels``)."""
    if len(shape) < 2:
      return (() if self.needs_axes else None), 0
    if not self.needs_axes:
      return None, 0
    if self.sel.is_traced:
      return self._refuse(path, shape, "the trace found no linear map in it, so this "
                          "compression has no input axes to use", traced=True)
    return self._refuse(path, shape, "it is not a Flax kernel (Equinox and PyTorch-style "
                        "weights are (out, in)), so its input axes are unknown")

  def _declared(self, path, shape, declared_axes, depth):
    ndim = len(shape)
    if declared_axes is None:  # a declared stack: each layer by Flax's names
      try:
        axes = tuple(a + depth for a in _paths.input_axes(path, shape[depth:]))
      except ValueError:
        return self._refuse(path, shape, f"each of its layers {shape[depth:]} is a "
                            f"multi-axis map whose input axes its name does not tell",
                            depth=depth)
      return (axes if self.needs_axes else None), depth
    axes = _paths._declared(path, shape, declared_axes)  # pylint: disable=protected-access
    if any(a < depth for a in axes):
      raise ValueError(f"{self.name}: the first {depth} axes of {path!r} {shape} index "
                       f"its stacked layers, so they cannot be input axes {axes}; declare "
                       f"the layer's input axes in the whole leaf's axes, e.g. "
                       f"in_axes={{{path!r}: {tuple(range(depth, ndim - 1))}}}.")
    return (axes if self.needs_axes else None), depth

  def _by_names(self, path, shape, declared_axes, depth):
    ndim = len(shape)
    name = path.rsplit("/", 1)[-1]
    if declared_axes is not None or depth:
      return self._declared(path, shape, declared_axes, depth)
    if name not in _paths.KERNEL_NAMES or ndim < 2:
      if not self.sel.include_non_kernels:
        if ndim < 2 or name in NOT_WEIGHTS:
          return None  # a bias, a scale, a table: never a weight by default
        return self._refuse(path, shape, "its name does not say it is a weight, nor its "
                            "layout (Gemma's einsum weights are named w, Equinox's "
                            "(out, in) weights weight)")
      return self._whole(path, shape)
    if ndim >= 3 and any(_SCAN.match(s) for s in path.split("/")[:-1]):
      return self._refuse(path, shape, "it sits under a Linen scan, so its first axes "
                          "may index the layers of a stack", stack=True)
    try:
      axes = _paths.input_axes(path, shape)
    except ValueError:
      return self._refuse(path, shape, self._why(shape), stack=ndim >= 3)
    return (axes if self.needs_axes else None), 0

  def _attention_without_its_siblings(self, chosen, flat) -> list[ValueError]:
    """A 3-D kernel under ``query`` / ``key`` / ``value`` / ``out`` is read as Flax
    attention only beside at least one sibling, all sharing one ``(heads, head_dim)``: a
    scanned stack of ``Dense`` layers so named has the same shapes, not that agreement."""
    out = []
    for path in chosen:
      parts = path.split("/")
      if len(flat[path].shape) != 3 or len(parts) < 2 or parts[-2] not in _ATTENTION:
        continue
      base = "/".join(parts[:-2])
      sib = {n: tuple(getattr(flat.get(f"{base}/{n}/kernel" if base else f"{n}/kernel"),
                              "shape", ())) for n in _ATTENTION}
      heads = {sib[n][1:] for n in ("query", "key", "value") if len(sib[n]) == 3}
      if len(sib["out"]) == 3:
        heads.add(sib["out"][:2])
      present = [n for n in _ATTENTION if sib[n]]
      if len(heads) != 1 or len(present) < 2 or any(len(sib[n]) != 3 for n in present):
        out.append(self._refuse(path, tuple(flat[path].shape), "a 3-axis kernel named "
                                "like an attention projection whose siblings do not "
                                "share one (heads, head_dim) may be a stack of layers",
                                stack=True))
    return out

  @staticmethod
  def _why(shape: tuple) -> str:
    return (f"a {len(shape)}-axis kernel may be a stack of {shape[0]} layers (nn.scan) or "
            f"one multi-axis map (DenseGeneral, Einsum), and its name does not say which")

  def _refuse(self, path, shape, why, *, stack=False, depth=0, traced=False):
    rx = f"^{re.escape(path)}$"
    keep = f"stacked={{{rx!r}: {depth}}}, " if depth else ""
    ways = [f"vj.Selection({keep}in_axes={{{rx!r}: (axis, ...)}}) with its real input "
            f"axes (in the whole leaf's axes)"]
    if stack:
      ways.insert(0, f"vj.Selection(stacked={{{rx!r}: 1}}) if its first axis indexes the "
                     f"layers of a stack")
    ways.append(f"vj.Selection(exclude={rx!r}) to keep it dense")
    first = ("" if traced else f"{_TRACE_HINT[0].upper()}{_TRACE_HINT[1:]}, or declare it: ")
    if traced:
      first = "Declare it: "
    return ValueError(f"{self.name}: cannot tell what {path} (shape {shape}) is: {why}. "
                      f"{first}{'; '.join(ways)}.")


_SCAN = re.compile(r"(?i)^scan")
_ATTENTION = ("query", "key", "value", "out")


def caller_level() -> int:
  """``stacklevel`` of the first frame outside ``vcon_jax`` (the user's call)."""
  frame, level = sys._getframe(2), 2  # pylint: disable=protected-access
  while frame is not None and frame.f_globals.get("__name__", "").startswith("vcon_jax"):
    frame, level = frame.f_back, level + 1
  return level


def from_keywords(name: str, selection: Selection | None, **old: Any) -> Selection:
  """The factory's :class:`Selection` from ``selection=`` or the 0.3 keywords (``where``,
  ``exclude``, ``in_axes``, ``stacked``, ``include_non_kernels``), which still work for
  one release with a ``DeprecationWarning`` naming the new spelling."""
  given = {k: v for k, v in old.items() if v is not None and v is not False}
  if selection is not None and not isinstance(selection, Selection):
    raise ValueError(f"{name}: selection must be a vj.Selection, got "
                     f"{type(selection).__name__}.")
  if not given:
    return selection if selection is not None else Selection()
  if selection is not None:
    raise ValueError(f"{name}: pass selection=vj.Selection(...) or the old keywords "
                     f"{sorted(given)}, not both.")
  spelled = ", ".join(f"{k}={v!r}" for k, v in given.items())
  warnings.warn(f"{name}({spelled}): these keywords are deprecated; pass "
                f"selection=vj.Selection({spelled}).", DeprecationWarning,
                stacklevel=caller_level())
  return Selection(**given)
