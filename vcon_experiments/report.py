"""Tables and plots of a comparison: mean +- std over seeds, share of the gap closed."""

from __future__ import annotations

import pathlib

import numpy as np

from vcon_experiments.config import severity_name
from vcon_experiments.io import write_text_atomic


#: Below this many accuracy points between dense and post-shot there is no gap to speak
#: of, and a share of it would be noise divided by noise.
MIN_GAP = 1.0


def gap_closed(method: float, post_shot: float, dense: float) -> float | None:
  """``(method - post-shot) / (dense - post-shot)`` (accuracies in %); None when the gap
  is under :data:`MIN_GAP` points."""
  gap = dense - post_shot
  return None if gap < MIN_GAP else (method - post_shot) / gap


def summarize(suite: dict) -> dict:
  """Per method: mean, std, n of final test accuracy (in %) and the gap share closed."""
  rows = {}
  for method, runs in suite["runs"].items():
    acc = np.array([r["test_accuracy"] for r in runs]) * 100
    rows[method] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1
                    else 0.0, "n": len(acc), "values": acc.round(2).tolist()}
  dense = suite["dense_accuracy"] * 100
  post = rows.get("post-shot", {}).get("mean")
  for method, row in rows.items():
    row["gap_closed"] = None if post is None else gap_closed(row["mean"], post, dense)
  return rows


def markdown(results: dict) -> str:
  lines = []
  for name, suite in results["suites"].items():
    rows = summarize(suite)
    lines += [f"### {name}", "",
              f"dense (ceiling): {suite['dense_accuracy'] * 100:.2f} %; "
              f"{suite.get('steps', '?')} fine-tuning steps for every method; "
              f"{suite['seeds']} seeds.", "",
              "| method | test accuracy % (mean +- std) | gap closed | seeds |",
              "|---|---|---|---|"]
    for method, r in rows.items():
      gap = "-" if r["gap_closed"] is None or method == "post-shot" else \
          f"{r['gap_closed'] * 100:.0f} %"
      lines.append(f"| {method} | {r['mean']:.2f} +- {r['std']:.2f} | {gap} | {r['n']} |")
    lines.append("")
  return "\n".join(lines)


def headline(results: dict) -> str:
  """One row per suite with all four methods: mean +- std (gap closed), dense as ceiling."""
  methods = ("post-shot", "gradual", "vcon", "vcon-distill")
  lines = ["| configuration | dense | " + " | ".join(methods) + " |",
           "|---|---|" + "---|" * len(methods)]
  for name, suite in results["suites"].items():
    rows = summarize(suite)
    if not all(m in rows for m in methods):
      continue
    cells = []
    for m in methods:
      r = rows[m]
      gap = "" if m == "post-shot" or r["gap_closed"] is None else \
          f" ({r['gap_closed'] * 100:+.0f} %)"
      cells.append(f"{r['mean']:.2f} +- {r['std']:.2f}{gap}")
    lines.append(f"| {name} | {suite['dense_accuracy'] * 100:.2f} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines) + "\n"


def _mean_curves(runs):
  by_step = {}
  for r in runs:
    for row in r["curve"]:
      if "test_accuracy" in row:
        by_step.setdefault(row["step"], []).append((row["test_accuracy"], row["beta"]))
  steps = sorted(by_step)
  acc = np.array([np.mean([a for a, _ in by_step[s]]) for s in steps]) * 100
  beta = np.array([np.mean([b for _, b in by_step[s]]) for s in steps])
  return np.array(steps), acc, beta


def plots(results: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Accuracy against step (beta beside it) and final accuracy with error bars, per suite."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []
  for name, suite in results["suites"].items():
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in suite["runs"].items():
      steps, acc, beta = _mean_curves(runs)
      if len(steps):
        line, = ax.plot(steps, acc, label=method)
        if beta.max() > 0:
          ax2 = getattr(ax, "_beta_axis", None) or ax.twinx()
          ax._beta_axis = ax2  # pylint: disable=protected-access
          ax2.plot(steps, beta, ls=":", color=line.get_color())
          ax2.set_ylabel("beta (dotted)")
          ax2.set_ylim(-0.02, 1.02)
    ax.axhline(suite["dense_accuracy"] * 100, color="k", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test accuracy of the compressed model (%)")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    rows = summarize(suite)
    bx.bar(list(rows), [r["mean"] for r in rows.values()],
           yerr=[r["std"] for r in rows.values()], capsize=4, color="tab:blue", alpha=0.7)
    bx.axhline(suite["dense_accuracy"] * 100, color="k", lw=0.8, ls="--")
    lo = min(r["mean"] - r["std"] for r in rows.values())
    bx.set_ylim(max(0, lo - 5), min(100, suite["dense_accuracy"] * 100 + 2))
    bx.set_ylabel("final test accuracy (%)")
    bx.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.tight_layout()
    path = out_dir / f"{name.replace('/', '_').replace(' ', '_')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def write(results: dict, out_dir: str | pathlib.Path) -> dict:
  """Writes ``results.json``, ``table.md`` and one PNG per suite into ``out_dir``."""
  from vcon_experiments.io import write_json_atomic  # pylint: disable=import-outside-toplevel
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = {name: summarize(s) for name, s in results["suites"].items()}
  write_json_atomic(out_dir / "results.json", {**results, "summary": summary})
  write_text_atomic(out_dir / "table.md", markdown(results))
  write_text_atomic(out_dir / "headline.md", headline(results))
  pngs = plots(results, out_dir)
  cells = map_cells(results)
  if cells:
    write_json_atomic(out_dir / "map.json", cells)
    write_text_atomic(out_dir / "map.md", map_markdown(cells))
    pngs += map_plots(cells, out_dir)
  return {"json": out_dir / "results.json", "table": out_dir / "table.md", "plots": pngs}


# ------------------------------------------------------------------------------- the map
#: The map's two regimes and its two differences (cell key, title), in table order.
_REGIMES = ("same-task", "transfer")
_DIFFERENCES = (("vcon_minus_post_shot", "VCON - post-shot"),
                ("vcon_minus_gradual", "VCON - gradual"))


def paired_difference(suite: dict, method: str, other: str) -> dict | None:
  """``method - other`` in accuracy points, paired by seed (same data order): mean, std
  over seeds and the per-seed values; None when either is missing."""
  a = {r["seed"]: r["test_accuracy"] for r in suite["runs"].get(method, [])}
  b = {r["seed"]: r["test_accuracy"] for r in suite["runs"].get(other, [])}
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return None
  d = np.array([(a[s] - b[s]) * 100 for s in seeds])
  return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
          "n": len(d), "values": d.round(2).tolist()}


def map_cells(results: dict) -> list[dict]:
  """One record per suite: dataset/model, regime, severity, budget and the differences."""
  cells = []
  for name, suite in results["suites"].items():
    cfg = suite["config"]
    if not cfg.get("epochs"):
      continue
    rows = summarize(suite)
    cells.append({
        "suite": name, "data": f"{cfg['dataset']}/{cfg['model']}", "regime": cfg["regime"],
        "severity": severity_name(cfg), "epochs": cfg["epochs"],
        "dense": suite["dense_accuracy"] * 100,
        "accuracy": {m: {k: r[k] for k in ("mean", "std", "n")} for m, r in rows.items()},
        "vcon_minus_post_shot": paired_difference(suite, "vcon", "post-shot"),
        "vcon_minus_gradual": paired_difference(suite, "vcon", "gradual")})
  return cells


def _fmt(d):
  return "-" if d is None else f"{d['mean']:+.2f} +- {d['std']:.2f} (n={d['n']})"


def _grid(cells: list[dict]) -> tuple[list, list]:
  """The axes of a map table or figure: budgets (sorted) and severities (first seen)."""
  return (sorted({c["epochs"] for c in cells}),
          list(dict.fromkeys(c["severity"] for c in cells)))


def _differences(cells: list[dict], regime: str, key: str, budgets: list,
                 sevs: list) -> dict:
  """``{(severity row, budget column): difference}`` of the cells of ``regime`` that
  have one (the first, where several share a place)."""
  found = {}
  for c in cells:
    if c["regime"] == regime and c[key] is not None:
      found.setdefault((sevs.index(c["severity"]), budgets.index(c["epochs"])), c[key])
  return found


def map_markdown(cells: list[dict]) -> str:
  """Per (data, regime): severity rows x budget columns of VCON - post-shot / - gradual."""
  lines = []
  for data in sorted({c["data"] for c in cells}):
    for regime in _REGIMES:
      sub = [c for c in cells if c["data"] == data and c["regime"] == regime]
      if not sub:
        continue
      budgets, sevs = _grid(sub)
      for key, title in _DIFFERENCES:
        found = _differences(sub, regime, key, budgets, sevs)
        lines += [f"### {data}, {regime}: {title} (accuracy points, mean +- std over "
                  f"seeds, paired by seed)", "",
                  "| severity | " + " | ".join(f"{b:g} epochs" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for i, sev in enumerate(sevs):
          row = [_fmt(found.get((i, j))) for j in range(len(budgets))]
          lines.append(f"| {sev} | " + " | ".join(row) + " |")
        lines.append("")
  return "\n".join(lines)


def map_plots(cells: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """One figure per data set: heat maps (severity x budget) of VCON - post-shot and
  VCON - gradual for both regimes, annotated with mean +- std over seeds."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []
  for data in sorted({c["data"] for c in cells}):
    sub = [c for c in cells if c["data"] == data]
    budgets, sevs = _grid(sub)
    fig, axes = plt.subplots(2, 2, figsize=(4 + 1.6 * len(budgets), 2.2 + 1.4 * len(sevs)),
                             squeeze=False)
    for i, regime in enumerate(_REGIMES):
      for j, (key, title) in enumerate(_DIFFERENCES):
        ax = axes[i][j]
        found = _differences(sub, regime, key, budgets, sevs)
        grid = np.full((len(sevs), len(budgets)), np.nan)
        for (row, col), d in found.items():
          grid[row, col] = d["mean"]
        lim = max(1.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0)
        ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for (row, col), d in found.items():
          ax.text(col, row, f"{d['mean']:+.1f}\n±{d['std']:.1f}", ha="center",
                  va="center", fontsize=8)
        ax.set_xticks(range(len(budgets)), [f"{b:g} ep" for b in budgets])
        ax.set_yticks(range(len(sevs)), sevs)
        ax.set_title(f"{regime}: {title}", fontsize=9)
    fig.suptitle(f"{data}: accuracy points (blue: VCON better), mean ± std over seeds",
                 fontsize=9)
    fig.tight_layout()
    path = out_dir / f"map_{data.replace('/', '_')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written
