"""The compressions of the suite: one entry each, with its transform, names and fields.

An entry builds the compression's :class:`vcon_jax.Transform` for a config (the target
compression or, for a method that ramps it in, the ramp over the transition's ``q``
steps), says how run directories (``prune90``) and tables (``prune 90%``) name its
severity, and which :class:`~vcon_experiments.config.Config` fields it reads; each reads
the config as its dict (``Config.to_dict()``). ``vcon_jax`` is imported only when a
transform is built, so that this registry, and :mod:`vcon_experiments.config` which
reads its names, stay free of JAX; of the suite it reads only the model registry.

A new compression: one :class:`Compression` in :data:`REGISTRY` (plus, if it needs new
config fields, one declaration each in ``Config``'s compression section, with
``omit_default=True``, and their names in the entry's ``fields``; their checks and
``vcon-jax`` flags follow).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

from vcon_experiments.model_registry import KEEP_DENSE

if TYPE_CHECKING:
  from vcon_jax import Transform


@dataclasses.dataclass(frozen=True)
class Compression:
  """One compression of the suite.

  Attributes:
    build: ``(config dict, params, model, example, gradual, q) -> Transform``: the
      target compression of the config, or with ``gradual`` its ramp over ``q`` steps;
      ``model`` and ``example`` (an input batch) are for the compressions that trace the
      model.
    run_name: ``config dict -> str``: the severity in run directory names (``prune90``).
    severity: ``config dict -> str``: the severity in tables and suite names
      (``prune 90%``).
    fields: the config fields it reads: a dense run resets them to their defaults
      (``runner.canonical``), and ``update_every`` names a run (``-every5``) only where
      it is read.

  The config dict is ``Config.to_dict()``, which leaves some fields out at their
  defaults (``pattern``, ``group_size``): read those with ``.get``.
  """

  build: Callable[[Mapping, Any, Any, Any, bool, int], Transform]
  run_name: Callable[[Mapping], str]
  severity: Callable[[Mapping], str]
  fields: tuple[str, ...] = ()


def pattern_of(text: str) -> tuple[int, int] | None:
  """``(n, m)`` of an ``"n:m"`` pattern, or ``None`` if it is not one."""
  parts = text.split(":") if isinstance(text, str) else []
  if len(parts) != 2 or not all(p.isdigit() for p in parts):
    return None
  n, m = int(parts[0]), int(parts[1])
  return (n, m) if 1 <= n < m else None


def _percent(d: Mapping) -> int:
  return round(d["sparsity"] * 100)


def _prune(cfg: Mapping, params, model, example, gradual: bool, q: int) -> Transform:
  """Unstructured pruning to ``sparsity`` (gradual: ramped from 0), or to an n:m
  ``pattern`` (gradual: keep-the-largest within each group of m, the kept share ramped
  to n/m)."""
  import vcon_jax as vj  # pylint: disable=import-outside-toplevel
  if cfg.get("pattern"):
    n, m = pattern_of(cfg["pattern"])
    if gradual:
      return vj.prune(sparsity=vj.polynomial_ramp(1 - n / m, 0, q), granularity="group",
                      group_size=m, update_every=cfg["update_every"],
                      selection=vj.Selection(exclude=KEEP_DENSE))
    return vj.prune(n=n, m=m, update_every=cfg["update_every"],
                    selection=vj.Selection(exclude=KEEP_DENSE))
  sparsity = vj.polynomial_ramp(cfg["sparsity"], 0, q) if gradual else cfg["sparsity"]
  return vj.prune(sparsity=sparsity, update_every=cfg["update_every"],
                  selection=vj.Selection(exclude=KEEP_DENSE))


def _binarize(cfg: Mapping, params, model, example, gradual: bool, q: int) -> Transform:
  """Sign and one scale per leaf (gradual: the bit width ramped from 8 to 1)."""
  import vcon_jax as vj  # pylint: disable=import-outside-toplevel
  if gradual:
    return vj.quantize(bits=vj.polynomial_ramp(1, 0, q, initial=8), per_channel=False,
                       selection=vj.Selection(exclude=KEEP_DENSE))
  return vj.binarize(selection=vj.Selection(exclude=KEEP_DENSE))


def _quantize(cfg: Mapping, params, model, example, gradual: bool, q: int) -> Transform:
  """``bits``-bit weights, a scale per output unit or per ``group_size`` inputs of it
  (gradual: the bit width ramped from 8)."""
  import vcon_jax as vj  # pylint: disable=import-outside-toplevel
  bits = vj.polynomial_ramp(cfg["bits"], 0, q, initial=8) if gradual else cfg["bits"]
  return vj.quantize(bits=bits, group_size=cfg.get("group_size") or None,
                     selection=vj.Selection(exclude=KEEP_DENSE))


def _low_rank_full(params: Any) -> int:
  """The largest full rank among the leaves low rank selects (the gradual ramp's start):
  the transform's own selection and each kernel's real input axes."""
  import vcon_jax as vj  # pylint: disable=import-outside-toplevel
  from vcon_jax import _paths  # pylint: disable=import-outside-toplevel
  select = vj.low_rank(1, selection=vj.Selection(exclude=KEEP_DENSE)).select
  declared = _paths.compile_in_axes(None)
  sizes = [min(_paths.matricize_shape(leaf.shape,
                                      _paths.input_axes(path, leaf.shape, declared)))
           for path, leaf in _paths.leaf_paths(params) if select(path, leaf)]
  return max(sizes) if sizes else 1


def _low_rank(cfg: Mapping, params, model, example, gradual: bool, q: int) -> Transform:
  """Rank-``rank`` factors (gradual: the rank ramped from the largest full rank; the
  factors keep each leaf's full rank)."""
  import vcon_jax as vj  # pylint: disable=import-outside-toplevel
  if gradual:
    full = _low_rank_full(params)
    return vj.low_rank(rank=vj.polynomial_ramp(cfg["rank"], 0, q, initial=full),
                       selection=vj.Selection(exclude=KEEP_DENSE))
  return vj.low_rank(rank=cfg["rank"], selection=vj.Selection(exclude=KEEP_DENSE))


def _prune_units(cfg: Mapping, params, model, example, gradual: bool,
                 q: int) -> Transform:
  """Structured pruning of ``sparsity`` of each unit group (MLP units, heads, channels:
  ``vj.find_units`` traces the model on ``example``; gradual: the fraction ramped from 0)."""
  import vcon_jax as vj  # pylint: disable=import-outside-toplevel
  if model is None or example is None:
    raise ValueError("prune-units needs the model and an example input: "
                     "methods.build(cfg, params, model, example).")
  units = vj.find_units(model, None, example)
  fraction = vj.polynomial_ramp(cfg["sparsity"], 0, q) if gradual else cfg["sparsity"]
  return vj.prune_units(fraction, units=units)


def _prune_name(d: Mapping) -> str:
  return f"prune{d['pattern'].replace(':', 'of')}" if d.get("pattern") else f"prune{_percent(d)}"


def _prune_severity(d: Mapping) -> str:
  return f"prune {d['pattern']}" if d.get("pattern") else f"prune {_percent(d)}%"


def _group(d: Mapping, sep: str) -> str:
  return f"{sep}g{d['group_size']}" if d.get("group_size") else ""


#: Every compression by its ``Config.compression`` name, in the order the CLI lists them.
REGISTRY: dict[str, Compression] = {
    "prune": Compression(_prune, _prune_name, _prune_severity,
                         ("sparsity", "pattern", "update_every")),
    "binarize": Compression(_binarize, lambda d: "binarize", lambda d: "binary"),
    "quantize": Compression(_quantize, lambda d: f"quantize{d['bits']}{_group(d, '')}",
                            lambda d: f"{d['bits']}-bit{_group(d, ' ')}",
                            ("bits", "group_size")),
    "low-rank": Compression(_low_rank, lambda d: f"lowrank{d['rank']}",
                            lambda d: f"rank {d['rank']}", ("rank",)),
    "prune-units": Compression(_prune_units, lambda d: f"units{_percent(d)}",
                               lambda d: f"units {_percent(d)}%", ("sparsity",)),
}

#: The config fields some compression reads, in registry order.
FIELDS = tuple(dict.fromkeys(f for c in REGISTRY.values() for f in c.fields))
