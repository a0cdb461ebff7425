"""The main job: dense pretraining, then every method for a compression across seeds.

A *suite* is one (dataset, compression) with every method and seed at the same step
budget; presets list suites (and the transition-length / beta-shape sweep).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time

from vcon_experiments import report, runner
from vcon_experiments.config import DATASET_DEFAULTS, METHODS, Config
from vcon_experiments.io import RunLockedError


def _dataset_cfg(base: Config, dataset: str) -> Config:
  return base.replace(dataset=dataset, **DATASET_DEFAULTS.get(dataset, {}))


#: Presets: name -> (list of (suite name, config changes, methods), seeds). ``default`` is
#: the README's main job (< 10 min on 2 CPU cores), ``quick`` the CI end-to-end check.
def presets(base: Config, seeds: int | None = None):
  fm = _dataset_cfg(base, "fashion_mnist")
  quick = fm.replace(model="mlp", model_kwargs={"hidden": (64,)}, train_limit=2048,
                     test_limit=512, pretrain_steps=60, steps=24, eval_every=8,
                     eval_examples=256, checkpoint_every=8, batch_size=64)
  wn = _dataset_cfg(base, "wordnet")
  def suites(cfg, ds):
    return [(f"{ds} {comp}", cfg.replace(compression=comp, **kw), METHODS)
            for comp, kw in (("prune", {"sparsity": 0.9}), ("binarize", {}),
                             ("low-rank", {"rank": base.rank}))]
  sweep = [(f"fashion_mnist/cnn prune Q={q}%", fm.replace(transition=q / 100), ("vcon",))
           for q in (10, 25, 50)]
  sweep.append(("fashion_mnist/cnn prune Q=25% cosine",
                fm.replace(transition=0.25, beta_schedule="cosine"), ("vcon",)))
  # what else we tried where VCON did not win: a higher fine-tuning learning rate (for
  # both), and a mask refreshed every 16 steps instead of every step
  sweep.append(("fashion_mnist/cnn prune lr=3e-3", fm.replace(lr=3e-3),
                ("post-shot", "vcon")))
  sweep.append(("fashion_mnist/cnn prune Q=25% update_every=16", fm.replace(update_every=16),
                ("vcon",)))
  suites_full = suites(fm, "fashion_mnist/cnn") + sweep + suites(wn, "wordnet/transformer")
  return {
      "map": (map_suites(base), seeds or 3),
      "quick": ([("fashion_mnist/mlp prune (quick)", quick, METHODS)], seeds or 2),
      "default": ([default_suite(base)], seeds or 3),
      "single": ([(f"{base.dataset}/{base.model} {base.compression}", base, METHODS)],
                 seeds or 3),
      "full": (suites_full, seeds or 3),
  }


#: The map: budget x severity, both regimes, for the paper's model family on 2 CPU cores:
#: a small ViT on Fashion-MNIST and the byte-level Transformer on WordNet supersenses,
#: fine-tuned on the first 15000 / 8000 training examples (epochs are of that set).
MAP_DATASETS = {
    "fashion_mnist/vit": dict(
        dataset="fashion_mnist", model="vit",
        model_kwargs={"patch_size": 7, "dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
        train_limit=15000, batch_size=128, pretrain_steps=1500, pretrain_lr=2e-3,
        eval_every=50, eval_examples=2000, checkpoint_every=500),
    "wordnet/transformer": dict(
        dataset="wordnet", model="transformer",
        model_kwargs={"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128}, max_len=48,
        train_limit=8000, test_limit=4000, batch_size=64, pretrain_steps=1500,
        pretrain_lr=2e-3, eval_every=50, eval_examples=2000, checkpoint_every=500),
}
_PRUNE90, _PRUNE98 = ("prune", {"sparsity": 0.9}), ("prune", {"sparsity": 0.98})
_BINARY, _RANK4 = ("binarize", {}), ("low-rank", {"rank": 4})
#: Budgets in epochs (in the order they run: the headline budget first) and the
#: severities measured at each, cut to what 2 CPU cores finish in about 1.5 hours.
MAP_GRID = {
    "fashion_mnist/vit": ((4, (_PRUNE90, _PRUNE98, _BINARY, _RANK4)),
                          (1, (_PRUNE90, _BINARY, _RANK4)),
                          (16, (_PRUNE90, _RANK4))),
    "wordnet/transformer": ((4, (_PRUNE90, _BINARY, _RANK4)),
                            (1, (_PRUNE90, _BINARY, _RANK4))),
}
HEADLINE_EPOCHS = 4


def default_suite(base: Config):
  """The main job: a cell of the map where VCON helps (README "Results" says why): the
  Fashion-MNIST ViT, same-task, 4 epochs, ``base``'s compression (prune 90 % unless the
  command line says otherwise), every method and the dense ceiling."""
  cfg = base.replace(**MAP_DATASETS["fashion_mnist/vit"], regime="same-task",
                     epochs=float(HEADLINE_EPOCHS))
  methods = ("dense",) + METHODS
  return (f"fashion_mnist/vit same-task {severity_name(cfg)} {HEADLINE_EPOCHS} ep", cfg,
          methods)


def severity_name(cfg: Config) -> str:
  return {"prune": f"prune {round(cfg.sparsity * 100)}%", "binarize": "binary",
          "quantize": f"{cfg.bits}-bit", "low-rank": f"rank {cfg.rank}"}[cfg.compression]


def map_suites(base: Config):
  """Suites of the map, in run order: headline budget first, then the others."""
  out = []
  order = max(len(b) for b in MAP_GRID.values())
  for k in range(order):
    for ds, kw in MAP_DATASETS.items():
      if k >= len(MAP_GRID[ds]):
        continue
      epochs, severities = MAP_GRID[ds][k]
      for regime in ("same-task", "transfer"):
        for comp, sev in severities:
          cfg = base.replace(**kw, regime=regime, epochs=float(epochs), compression=comp,
                             **sev)
          methods = ("post-shot", "gradual", "vcon")
          if epochs == HEADLINE_EPOCHS:
            methods += ("vcon-distill",)
          # the ceiling: the same fine-tuning without compression (in the transfer regime
          # there is no other: the pretrained model has no head for the target task)
          methods = ("dense",) + methods
          out.append((f"{ds} {regime} {severity_name(cfg)} {epochs} ep", cfg, methods))
  return out


def _jobs(suites, n_seeds, methods):
  """(suite name, config) of every run: budget by budget (in the order the suites list
  them), seed-major within a budget, so that a partial run covers whole budgets."""
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
  return [(name, cfg) for _, _, name, cfg in jobs]


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
  table = presets(base, seeds)
  if preset not in table:
    raise ValueError(f"preset {preset!r} is not allowed; choose one of {', '.join(table)}.")
  if preset in ("default", "map") and base.dataset != Config.dataset:
    raise ValueError(f"--preset {preset} runs its own data sets, not --dataset "
                     f"{base.dataset}; use --preset single for the configuration as given.")
  suites, n_seeds = table[preset]
  root = pathlib.Path(root)
  t_all = time.time()
  i, n = shard
  if not collect:
    for k, (name, c) in enumerate(_jobs(suites, n_seeds, methods)):
      if k % n != i:
        continue
      r = _retry(lambda c=c: runner.compress(c, root / data_key(c), progress=progress,
                                             on_nonfinite=on_nonfinite), echo)
      echo(f"{name:44s} {c.method:13s} seed {c.seed}: test accuracy "
           f"{r['test_accuracy'] * 100:.2f} %")
  if n > 1 and not collect:
    return {}
  results = {"preset": preset, "suites": {}, "wall_s": {}, "missing": 0}
  for name, cfg, suite_methods in suites:
    suite_root = root / data_key(cfg)
    dense = _retry(lambda cfg=cfg: runner.pretrain(cfg, suite_root, progress=progress,
                                                   on_nonfinite=on_nonfinite)
                   if not collect else runner.pretrain_result(cfg, suite_root), echo)
    if dense is None:
      results["missing"] += 1
      continue
    suite = {"dense_accuracy": dense["test_accuracy"], "seeds": n_seeds,
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
        suite["runs"].setdefault(_label(c, suite_methods), []).append(
            {**{k: v for k, v in r.items() if k != "summary"}, "seed": seed,
             "curve": [{"step": 0, "beta": 1.0 if c.method.startswith("vcon") else 0.0,
                        "test_accuracy": r["compressed_at_start"]}] +
                      [{k: row[k] for k in ("step", "beta", "test_accuracy") if k in row}
                       for row in curve if "test_accuracy" in row]})
    if "post-shot" not in suite["runs"]:
      # a sweep's Q = 0 point is the post-shot run of its suite, reused when it exists
      # (post-shot ignores transition and beta shape; its runs carry the defaults)
      post = cfg.replace(method="post-shot", transition=Config.transition,
                         beta_schedule=Config.beta_schedule)
      runs = [runner.result_of(post.replace(seed=s), suite_root) for s in range(n_seeds)]
      if all(runs):
        suite["runs"] = {"post-shot": [{**r, "seed": s, "curve": []}
                                       for s, r in enumerate(runs)], **suite["runs"]}
    if "dense" in suite["runs"]:  # transfer: the dense fine-tune at the same budget
      accs = [r["test_accuracy"] for r in suite["runs"]["dense"]]
      suite["dense_accuracy"] = sum(accs) / len(accs)
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
  if len(suite_methods) == 1 and cfg.method == "vcon":
    extra = f" update_every={cfg.update_every}" if cfg.update_every != 1 else ""
    return f"vcon Q={round(cfg.transition * 100)}% {cfg.beta_schedule}{extra}"
  return cfg.method


def data_key(cfg: Config) -> str:
  """The directory of everything that shares one dense model: data, model, regime and a
  short hash of the rest of the dense configuration."""
  digest = hashlib.sha1(json.dumps(cfg.dense_key(), sort_keys=True).encode()).hexdigest()
  name = cfg.dataset.replace('/', '_').replace(':', '_')
  return f"{name}-{cfg.model}-{cfg.regime}-{digest[:6]}"
