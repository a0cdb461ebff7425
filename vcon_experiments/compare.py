"""The main job: dense pretraining, then every method for a compression across seeds.

A *suite* is one (dataset, compression) with every method and seed at the same step
budget; a preset (a JSON file in :mod:`vcon_experiments.presets`) lists suites, the map
as a grid of budget x severity x regime.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import time

from vcon_experiments import method_registry
from vcon_experiments import presets as presets_lib
from vcon_experiments import pretrain, report, runner, tasks
from vcon_experiments.config import Config
from vcon_experiments.io import RunLockedError


def _jobs(suites, n_seeds, methods):
  """(suite name, config) of every run: budget by budget (in the order the suites list
  them), seed-major within a budget, so that a partial run covers whole budgets.

  A run that several suites share (the dense fine-tune of a budget serves every
  severity) is listed once, where it first comes, so that no two shards run it.
  """
  ranks = {}
  for _, cfg, _ in suites:
    ranks.setdefault((cfg.epochs, cfg.steps), len(ranks))
  jobs = []
  for seed in range(n_seeds):
    for name, cfg, suite_methods in suites:
      for method in methods or suite_methods:
        jobs.append((ranks[(cfg.epochs, cfg.steps)], seed, name,
                     cfg.replace(method=method, seed=seed)))
  jobs.sort(key=lambda j: j[:2])  # stable: suite order kept within (budget, seed)
  seen = {}
  unique = []
  for _, _, name, cfg in jobs:
    where = (data_key(cfg), cfg.run_name())
    stored = runner.canonical(cfg).to_dict()
    if cfg.epochs > 0:  # runner.resolve derives the steps from the data set
      del stored["steps"]
    if where in seen:
      if seen[where] != stored:
        diff = sorted(k for k in stored if stored[k] != seen[where].get(k))
        raise ValueError(f"two runs of the preset share the run directory "
                         f"{'/'.join(where)} with different configs (differs in: "
                         f"{', '.join(diff)}); give them options that change the run name.")
      continue
    seen[where] = stored
    unique.append((name, cfg))
  return unique


def _retry(fn, echo):
  while True:
    try:
      return fn()
    except RunLockedError as err:  # another process runs it: wait for its result
      echo(f"waiting: {err}")
      time.sleep(15)


def run(preset: str, base: Config, root: str | pathlib.Path, out: str | pathlib.Path,
        *, seeds: int | None = None, methods=None, progress: bool = True,
        echo=print, on_nonfinite: str = "stop", shard: tuple[int, int] = (0, 1),
        collect: bool = False) -> dict:
  """Runs a preset's suites (reusing finished runs) and writes the table and plots.

  ``shard=(i, n)``: run only every n-th run starting at the i-th (start n processes with
  i = 0 .. n-1 to share a machine's cores); ``collect=True``: run nothing and report the
  finished runs (missing ones are left out and counted).
  """
  if presets_lib.fixed_data(preset) and base.dataset != Config.dataset:
    raise ValueError(f"--preset {preset} runs its own data sets, not --dataset "
                     f"{base.dataset}; use --preset single for the configuration as given.")
  suites, n_seeds = presets_lib.suites(preset, base, seeds)
  root = pathlib.Path(root)
  t_all = time.time()
  i, n = shard
  if not collect:
    for k, (name, c) in enumerate(_jobs(suites, n_seeds, methods)):
      if k % n != i:
        continue
      r = _retry(lambda c=c: runner.train_and_evaluate(
          c, root / data_key(c), progress=progress, on_nonfinite=on_nonfinite), echo)
      key = tasks.metric_key(c)
      echo(f"{name:44s} {c.method:13s} seed {c.seed}: test {key[5:]} "
           f"{report.METRICS[key].show(r[key])}")
  if n > 1 and not collect:
    return {}
  results = {"preset": preset, "suites": {}, "wall_s": {}, "missing": 0}
  for name, cfg, suite_methods in suites:
    suite_root = root / data_key(cfg)
    if collect:
      dense = pretrain.pretrain_result(cfg, suite_root)
    else:
      dense = _retry(functools.partial(pretrain.pretrain, cfg, suite_root, progress=progress,
                                       on_nonfinite=on_nonfinite), echo)
    if dense is None:
      results["missing"] += 1
      continue
    key = tasks.metric_key(cfg)
    suite = {"metric": key, "dense": dense[key], "seeds": n_seeds,
             "config": cfg.to_dict(), "runs": {}, "wall_s": 0.0}
    for method in methods or suite_methods:
      for seed in range(n_seeds):
        c = cfg.replace(method=method, seed=seed)
        r = runner.result_of(c, suite_root)
        if r is None:
          results["missing"] += 1
          continue
        suite["steps"] = r["steps"]
        suite["wall_s"] += r.get("wall_s", 0.0)
        curve = runner.metrics_of(c, suite_root)
        beta = method_registry.REGISTRY[c.method].beta_at_start
        suite["runs"].setdefault(_label(c, suite_methods), []).append(
            {**{k: v for k, v in r.items() if k != "summary"}, "seed": seed,
             "curve": [{"step": 0, "beta": beta,
                        key: r["compressed_at_start"]}] +
                      [{k: row[k] for k in ("step", "beta", key) if k in row}
                       for row in curve if key in row]})
    baseline = method_registry.BASELINE
    if baseline not in suite["runs"]:
      # a sweep's Q = 0 point is the post-shot run of its suite, reused when it exists
      # (post-shot ignores transition and beta shape; its runs carry the defaults)
      post = cfg.replace(method=baseline, transition=Config.transition,
                         beta_schedule=Config.beta_schedule, beta_hold=Config.beta_hold,
                         lr_schedule=Config.lr_schedule)
      runs = [runner.result_of(post.replace(seed=s), suite_root) for s in range(n_seeds)]
      if all(runs):
        suite["runs"] = {baseline: [{**r, "seed": s, "curve": []}
                                    for s, r in enumerate(runs)], **suite["runs"]}
    for method in methods or suite_methods:
      if not method_registry.REGISTRY[method].compresses and method in suite["runs"]:
        # transfer: the dense fine-tune at the same budget is the dense reference
        accs = [r[key] for r in suite["runs"][method]]
        suite["dense"] = sum(accs) / len(accs)
    if not suite["runs"]:
      continue
    results["suites"][name] = suite
    results["wall_s"][name] = suite["wall_s"]
  results["wall_s"]["total"] = time.time() - t_all
  written = report.write(results, out)
  echo(report.markdown(results))
  echo(f"wrote {written['table']}, {written['json']} and {len(written['plots'])} plot(s)")
  return results


def _label(cfg: Config, suite_methods) -> str:
  """The method's row in the suite's table: its name or, in a sweep of one method whose
  beta vanishes, its transition (``vcon Q=25% cosine``)."""
  if len(suite_methods) == 1 and method_registry.REGISTRY[cfg.method].transition == "beta":
    extra = f" update_every={cfg.update_every}" if cfg.update_every != 1 else ""
    return f"{cfg.method} Q={round(cfg.transition * 100)}% {cfg.beta_schedule}{extra}"
  return cfg.method


def data_key(cfg: Config) -> str:
  """The directory of everything that shares one dense model: data, model, regime and a
  short hash of the rest of the dense configuration."""
  digest = hashlib.sha1(json.dumps(cfg.dense_key(), sort_keys=True).encode()).hexdigest()
  name = cfg.dataset.replace('/', '_').replace(':', '_')
  return f"{name}-{cfg.model}-{cfg.regime}-{digest[:6]}"
