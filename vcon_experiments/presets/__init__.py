"""Experiment presets: one JSON file per preset in this package, read by ``vcon-jax compare
--preset NAME``.

A preset is a list of *suites* (a suite: one configuration, every listed method, every
seed at the same budget). Its file holds data only:

- ``__doc__``: the command that runs it, how long it takes on which machine, and the
  result it should give;
- ``seeds``: the number of seeds when ``--seeds`` is not given;
- ``fixed_data`` (optional, false): the preset runs its own data sets and refuses
  ``--dataset``;
- ``suites`` (optional): ``{"name", "config", "methods"}`` each; ``config`` is a dict of
  :class:`~vcon_experiments.config.Config` changes applied on top of the command line's
  config, ``methods`` (names in :data:`~vcon_experiments.method_registry.REGISTRY`)
  defaults to :data:`~vcon_experiments.method_registry.HEADLINE`, and ``name`` may name
  fields of the resulting config (``{dataset}``, ``{compression}``, ...) and
  ``{severity}`` (``prune 90%``, ``binary``, ``rank 4``);
- ``grid`` (optional, after the suites): budget x severity x regime per data set, run
  budget by budget (the first budget of every data set, then the second, ...); see
  ``map.json``.

The files are package data (not in ``experiments/configs/``) so that an installed
``vcon-jax`` finds them; ``experiments/configs/`` holds configs for ``--config``.
"""

from __future__ import annotations

import importlib.resources
import json

from vcon_experiments import method_registry
from vcon_experiments.config import FIELDS, Config, severity_name
from vcon_experiments.config import _did_you_mean  # pylint: disable=protected-access

_KEYS = ("__doc__", "seeds", "fixed_data", "suites", "grid")
_SUITE_KEYS = ("name", "config", "methods")
_GRID_KEYS = ("regimes", "methods", "headline_epochs", "headline_only", "severities",
              "datasets")


def names() -> tuple[str, ...]:
  """The presets there are files for, sorted."""
  files = importlib.resources.files(__name__).iterdir()
  return tuple(sorted(f.name[:-len(".json")] for f in files if f.name.endswith(".json")))


def load(name: str) -> dict:
  """The contents of preset ``name``'s file, checked (:func:`check`)."""
  if name not in names():
    raise ValueError(f"preset {name!r} is not allowed; choose one of {', '.join(names())}.")
  text = importlib.resources.files(__name__).joinpath(f"{name}.json").read_text("utf-8")
  return check(name, json.loads(text))


def check(name: str, preset: dict) -> dict:
  """Raises ``ValueError`` for a key the format does not have (config keys included),
  one it needs, or a method the registry does not have."""
  _check_keys(f"preset {name!r}", preset, _KEYS, ("seeds",))
  for suite in preset.get("suites", ()):
    _check_keys(f"a suite of preset {name!r}", suite, _SUITE_KEYS, ("name",))
    _check_keys(f"the config of suite {suite['name']!r}", suite.get("config", {}), FIELDS)
    _check_methods(f"suite {suite['name']!r}", suite.get("methods", ()))
  if "grid" in preset:
    grid = preset["grid"]
    _check_keys(f"the grid of preset {name!r}", grid, _GRID_KEYS, _GRID_KEYS)
    for data, spec in grid["datasets"].items():
      _check_keys(f"grid data set {data!r}", spec, ("config", "budgets"), ("config", "budgets"))
      _check_keys(f"the config of grid data set {data!r}", spec["config"], FIELDS)
    for severity, changes in grid["severities"].items():
      _check_keys(f"grid severity {severity!r}", changes, FIELDS)
    _check_methods(f"the grid of preset {name!r}", grid["methods"] + grid["headline_only"])
  return preset


def _check_methods(what: str, methods) -> None:
  allowed = method_registry.REGISTRY
  unknown = [m for m in methods if m not in allowed]
  if unknown:
    hint = _did_you_mean(unknown[0], allowed)
    raise ValueError(f"{what} has the unknown method {unknown[0]!r}"
                     f"{f' ({hint})' if hint else ''}; allowed: {', '.join(allowed)}.")


def _check_keys(what: str, d: dict, allowed, required=()) -> None:
  unknown = [k for k in d if k not in allowed]
  if unknown:
    hint = _did_you_mean(unknown[0], allowed)
    raise ValueError(f"{what} has the unknown key {unknown[0]!r}"
                     f"{f' ({hint})' if hint else ''}; allowed: {', '.join(allowed)}.")
  missing = [k for k in required if k not in d]
  if missing:
    raise ValueError(f"{what} has no {missing[0]!r}; it needs {', '.join(required)}.")


def suites(name: str, base: Config, seeds: int | None = None
           ) -> tuple[list[tuple[str, Config, tuple[str, ...]]], int]:
  """``(suites, n_seeds)`` of preset ``name`` on top of the command line's ``base``:
  each suite ``(suite name, config, methods)``, in run order."""
  preset = load(name)
  out = [_suite(s, base) for s in preset.get("suites", ())]
  if "grid" in preset:
    out += grid_suites(preset["grid"], base)
  return out, seeds or preset["seeds"]


def fixed_data(name: str) -> bool:
  """Whether preset ``name`` runs its own data sets (and so refuses ``--dataset``)."""
  return bool(load(name).get("fixed_data", False))


def _suite(suite: dict, base: Config):
  cfg = base.replace(**suite.get("config", {}))
  title = suite["name"].format(severity=severity_name(cfg), **cfg.to_dict())
  return title, cfg, tuple(suite.get("methods", method_registry.HEADLINE))


def grid_suites(grid: dict, base: Config):
  """The suites of a grid, budget by budget: the k-th budget of every data set (in file
  order), each regime, each severity; ``headline_only`` methods only at
  ``headline_epochs``; the distillation methods only in the same-task regime."""
  out = []
  rounds = max(len(d["budgets"]) for d in grid["datasets"].values())
  for k in range(rounds):
    for data, spec in grid["datasets"].items():
      if k >= len(spec["budgets"]):
        continue
      epochs, severities = spec["budgets"][k]
      methods = tuple(m for m in grid["methods"]
                      if epochs == grid["headline_epochs"] or m not in grid["headline_only"])
      for regime in grid["regimes"]:
        kept = tuple(m for m in methods if method_registry.fits_regime(m, regime))
        for severity in severities:
          cfg = base.replace(**spec["config"], regime=regime, epochs=float(epochs),
                             **grid["severities"][severity])
          out.append((f"{data} {regime} {severity_name(cfg)} {epochs:g} ep", cfg, kept))
  return out
