"""The table of README.md from the runs: python table.py runs"""
import collections, json, pathlib, sys

import numpy as np

root = pathlib.Path(sys.argv[1])
rows = collections.defaultdict(dict)
for f in root.rglob("result.json"):
  parts = f.relative_to(root).parts
  if "dense" in parts:
    continue
  cell, method, seed = parts[-4], parts[-3], parts[-2]
  rows[(cell, method)][seed] = 100 * json.loads(f.read_text())["test_accuracy"]
print("| cell | method | test accuracy % | VCON - post-shot (paired) | seeds |\n|---|---|---|---|---|")
for (cell, method), by in sorted(rows.items()):
  base = rows.get((cell, "post-shot"), {})
  v = np.array([by[s] for s in sorted(by)])
  d = [by[s] - base[s] for s in sorted(by) if s in base]
  diff = "-" if method == "post-shot" else f"{np.mean(d):+.2f} +- {np.std(d, ddof=1):.2f}"
  print(f"| {cell} | {method} | {v.mean():.2f} +- {v.std(ddof=1):.2f} | {diff} | {len(v)} |")
