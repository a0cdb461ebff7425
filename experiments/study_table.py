"""The table of a study's README from its runs: ``python experiments/study_table.py RUNS``.

RUNS holds ``.../<cell>/<method>/seed<k>/result.json`` files (a ``vcon-jax compare``
workdir or the study's committed ``runs/``). One row per (cell, method): the compressed
model's test metric, mean +- std over seeds, and the method minus the baseline
(post-shot) paired by seed, positive where the method is better (accuracy points up, or
bits per byte saved).
"""
import collections
import json
import pathlib
import sys

import numpy as np

from vcon_experiments.method_registry import BASELINE

#: metric key -> (column title, difference title, scale, decimals, sign of "better")
METRICS = {"test_bpb": ("test bpb", "saved vs post-shot (paired)", 1.0, 3, -1),
           "test_accuracy": ("test accuracy %", "VCON - post-shot (paired)", 100.0, 2, 1)}


def _std(x):
  return np.std(x, ddof=1) if len(x) > 1 else 0.0


def table(root: pathlib.Path) -> str:
  rows, metric = collections.defaultdict(dict), None
  for f in root.rglob("result.json"):
    parts = f.relative_to(root).parts
    if "dense" in parts:
      continue
    r = json.loads(f.read_text())
    metric = metric or next(k for k in METRICS if k in r)
    rows[(parts[-4], parts[-3])][parts[-2]] = METRICS[metric][2] * r[metric]
  title, diff_title, _, dp, sign = METRICS[metric]
  out = [f"| cell | method | {title} | {diff_title} | seeds |", "|---|---|---|---|---|"]
  for (cell, method), by in sorted(rows.items()):
    base = rows.get((cell, BASELINE), {})
    v = np.array([by[s] for s in sorted(by)])
    d = [sign * (by[s] - base[s]) for s in sorted(by) if s in base]
    diff = "-" if method == BASELINE else f"{np.mean(d):+.{dp}f} +- {_std(d):.{dp}f}"
    out.append(f"| {cell} | {method} | {v.mean():.{dp}f} +- {_std(v):.{dp}f} | {diff} | "
               f"{len(v)} |")
  return "\n".join(out)


if __name__ == "__main__":
  print(table(pathlib.Path(sys.argv[1])))
