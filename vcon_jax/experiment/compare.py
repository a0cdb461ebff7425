"""The main job: dense pretraining, then every method for a compression across seeds.

A *suite* is one (dataset, compression) with every method and seed at the same step
budget; presets list suites (and the transition-length / beta-shape sweep).
"""

from __future__ import annotations

import pathlib
import time

from vcon_jax.experiment import report, runner
from vcon_jax.experiment.config import DATASET_DEFAULTS, METHODS, Config
from vcon_jax.experiment.io import RunLockedError


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
      "quick": ([("fashion_mnist/mlp prune (quick)", quick, METHODS)], seeds or 2),
      "default": ([(f"fashion_mnist/cnn {base.compression}", fm, METHODS)], seeds or 3),
      "single": ([(f"{base.dataset}/{base.model} {base.compression}", base, METHODS)],
                 seeds or 3),
      "full": (suites_full, seeds or 3),
  }


def run(preset: str, base: Config, root: str | pathlib.Path, out: str | pathlib.Path,
        *, seeds: int | None = None, methods=None, progress: bool = True,
        echo=print, on_nonfinite: str = "stop") -> dict:
  """Runs a preset's suites (reusing finished runs) and writes the table and plots."""
  table = presets(base, seeds)
  if preset not in table:
    raise ValueError(f"preset {preset!r} is not allowed; choose one of {', '.join(table)}.")
  suites, n_seeds = table[preset]
  root = pathlib.Path(root)
  results = {"preset": preset, "suites": {}, "wall_s": {}}
  t_all = time.time()
  for name, cfg, suite_methods in suites:
    t0 = time.time()
    suite_root = root / data_key(cfg)
    dense = runner.pretrain(cfg, suite_root, progress=progress,
                            on_nonfinite=on_nonfinite)
    suite = {"dense_accuracy": dense["test_accuracy"], "steps": cfg.steps,
             "seeds": n_seeds, "config": cfg.to_dict(), "runs": {}}
    for method in methods or suite_methods:
      for seed in range(n_seeds):
        c = cfg.replace(method=method, seed=seed)
        while True:
          try:
            r = runner.compress(c, suite_root, progress=progress,
                                on_nonfinite=on_nonfinite)
            break
          except RunLockedError as err:  # another process runs it: use its result
            echo(f"waiting: {err}")
            time.sleep(15)
        run_dir = suite_root / c.run_name()
        curve = runner.RunDir(run_dir, c.to_dict()).metrics()
        suite["runs"].setdefault(_label(c, suite_methods), []).append(
            {**{k: v for k, v in r.items() if k != "summary"}, "seed": seed,
             "curve": [{"step": 0, "beta": 1.0 if c.method.startswith("vcon") else 0.0,
                        "test_accuracy": r["compressed_at_start"]}] +
                      [{k: row[k] for k in ("step", "beta", "test_accuracy") if k in row}
                       for row in curve if "test_accuracy" in row]})
        echo(f"{name:40s} {method:13s} seed {seed}: test accuracy "
             f"{r['test_accuracy'] * 100:.2f} % (dense {dense['test_accuracy'] * 100:.2f})")
    if "post-shot" not in suite["runs"]:
      # a sweep's Q = 0 point is the post-shot run of its suite, reused when it exists
      # (post-shot ignores transition and beta shape; its runs carry the defaults)
      post = cfg.replace(method="post-shot", transition=Config.transition,
                         beta_schedule=Config.beta_schedule)
      runs = [runner.RunDir(suite_root / post.replace(seed=s).run_name(),
                            post.replace(seed=s).to_dict()).result()
              for s in range(n_seeds)]
      if all(runs):
        suite["runs"] = {"post-shot": [{**r, "seed": s, "curve": []}
                                       for s, r in enumerate(runs)], **suite["runs"]}
    results["suites"][name] = suite
    results["wall_s"][name] = time.time() - t0
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
  return f"{cfg.dataset.replace('/', '_').replace(':', '_')}-{cfg.model}"
