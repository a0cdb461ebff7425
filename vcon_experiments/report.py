"""Tables and plots of a comparison: mean +- std over seeds, share of the gap closed.

A suite carries its metric's result key (``suite["metric"]``: ``test_accuracy`` for the
classifiers, ``test_bpb`` for the language model) and the dense value (``suite["dense"]``).
Every table and figure is written so that a positive difference means the first method
is better: accuracy points ``VCON - post-shot``, or bits per byte ``post-shot - VCON``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

from vcon_experiments.config import severity_name
from vcon_experiments.io import write_text_atomic
from vcon_experiments.method_registry import BASELINE, HEADLINE


@dataclasses.dataclass(frozen=True)
class Metric:
  """How a result field is shown: scale (x100 for %), unit, direction, smallest gap."""

  key: str
  name: str
  header: str  # the table column's title
  unit: str
  scale: float
  higher_is_better: bool
  #: Below this many units between dense and post-shot there is no gap to speak of, and
  #: a share of it would be noise divided by noise.
  min_gap: float
  digits: int

  def fmt(self, value: float) -> str:
    return f"{value:.{self.digits}f}"

  def show(self, value: float | None) -> str:
    """A result field's raw value as a sentence says it: ``87.25 %``, ``2.104 bits/byte``."""
    return "-" if value is None else f"{self.fmt(value * self.scale)} {self.unit}"

  def better(self, a: float, b: float) -> float:
    """How much better ``a`` is than ``b`` (in display units; positive: ``a`` better)."""
    return (a - b) if self.higher_is_better else (b - a)


METRICS = {
    "test_accuracy": Metric("test_accuracy", "test accuracy", "test accuracy %", "%", 100.0,
                            True, 1.0, 2),
    "test_bpb": Metric("test_bpb", "test bits per byte", "test bits/byte", "bits/byte", 1.0,
                       False, 0.01, 3),
}


def metric_of(suite: dict) -> Metric:
  return METRICS[suite.get("metric", "test_accuracy")]


def gap_closed(method: float, post_shot: float, dense: float,
               metric: Metric = METRICS["test_accuracy"]) -> float | None:
  """The share of the dense - post-shot gap that ``method`` closes (values in display
  units, e.g. accuracies in %); None when the gap is under the metric's ``min_gap``."""
  gap = metric.better(dense, post_shot)
  return None if gap < metric.min_gap else metric.better(method, post_shot) / gap


def summarize(suite: dict) -> dict:
  """Per method: mean, std, n of the final test metric (display units) and the share of
  the dense - baseline (post-shot) gap closed."""
  metric = metric_of(suite)
  rows = {}
  for method, runs in suite["runs"].items():
    acc = np.array([r[metric.key] for r in runs]) * metric.scale
    rows[method] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1
                    else 0.0, "n": len(acc), "values": acc.round(4).tolist()}
  dense = suite["dense"] * metric.scale
  post = rows.get(BASELINE, {}).get("mean")
  for row in rows.values():
    row["gap_closed"] = None if post is None else gap_closed(row["mean"], post, dense,
                                                             metric)
  return rows


def markdown(results: dict) -> str:
  lines = []
  for name, suite in results["suites"].items():
    rows, m = summarize(suite), metric_of(suite)
    lines += [f"### {name}", "",
              f"dense (ceiling): {m.fmt(suite['dense'] * m.scale)} {m.unit}; "
              f"{suite.get('steps', '?')} fine-tuning steps for every method; "
              f"{suite['seeds']} seeds.", "",
              f"| method | {m.header} (mean +- std) | gap closed | seeds |",
              "|---|---|---|---|"]
    for method, r in rows.items():
      gap = "-" if r["gap_closed"] is None or method == BASELINE else \
          f"{r['gap_closed'] * 100:.0f} %"
      lines.append(f"| {method} | {m.fmt(r['mean'])} +- {m.fmt(r['std'])} | {gap} | "
                   f"{r['n']} |")
    lines.append("")
  return "\n".join(lines)


def headline(results: dict) -> str:
  """One row per suite with every headline method: mean +- std (gap closed), dense as
  ceiling."""
  methods = HEADLINE
  lines = ["| configuration | dense | " + " | ".join(methods) + " |",
           "|---|---|" + "---|" * len(methods)]
  for name, suite in results["suites"].items():
    rows, metric = summarize(suite), metric_of(suite)
    if not all(m in rows for m in methods):
      continue
    cells = []
    for m in methods:
      r = rows[m]
      gap = "" if m == BASELINE or r["gap_closed"] is None else \
          f" ({r['gap_closed'] * 100:+.0f} %)"
      cells.append(f"{metric.fmt(r['mean'])} +- {metric.fmt(r['std'])}{gap}")
    lines.append(f"| {name} | {metric.fmt(suite['dense'] * metric.scale)} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _mean_curves(runs, metric: Metric):
  by_step = {}
  for r in runs:
    for row in r["curve"]:
      if metric.key in row:
        by_step.setdefault(row["step"], []).append((row[metric.key], row["beta"]))
  steps = sorted(by_step)
  acc = np.array([np.mean([a for a, _ in by_step[s]]) for s in steps]) * metric.scale
  beta = np.array([np.mean([b for _, b in by_step[s]]) for s in steps])
  return np.array(steps), acc, beta


def plots(results: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """The metric against step (beta beside it) and its final value with error bars, per
  suite."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []
  for name, suite in results["suites"].items():
    m = metric_of(suite)
    dense = suite["dense"] * m.scale
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in suite["runs"].items():
      steps, acc, beta = _mean_curves(runs, m)
      if len(steps):
        line, = ax.plot(steps, acc, label=method)
        if beta.max() > 0:
          ax2 = getattr(ax, "_beta_axis", None) or ax.twinx()
          ax._beta_axis = ax2  # pylint: disable=protected-access
          ax2.plot(steps, beta, ls=":", color=line.get_color())
          ax2.set_ylabel("beta (dotted)")
          ax2.set_ylim(-0.02, 1.02)
    ax.axhline(dense, color="k", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"{m.name} of the compressed model ({m.unit})")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7, loc="lower right" if m.higher_is_better else "upper right")
    rows = summarize(suite)
    bx.bar(list(rows), [r["mean"] for r in rows.values()],
           yerr=[r["std"] for r in rows.values()], capsize=4, color="tab:blue", alpha=0.7)
    bx.axhline(dense, color="k", lw=0.8, ls="--")
    lo = min(r["mean"] - r["std"] for r in rows.values())
    hi = max(r["mean"] + r["std"] for r in rows.values())
    if m.higher_is_better:
      bx.set_ylim(max(0, lo - 5), min(100, dense + 2))
    else:
      bx.set_ylim(max(0, min(lo, dense) * 0.95), hi * 1.02)
    bx.set_ylabel(f"final {m.name} ({m.unit})")
    bx.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.tight_layout()
    safe = re.sub(r"[^\w.%+-]", "_", name)  # no ':' (2:4) or '/' in file names
    path = out_dir / f"{safe}.png"
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
#: The map's two regimes and its two differences (cell key, title, method, other), in
#: table order.
_REGIMES = ("same-task", "transfer")
_DIFFERENCES = (("vcon_minus_post_shot", "VCON - post-shot", "vcon", BASELINE),
                ("vcon_minus_gradual", "VCON - gradual", "vcon", "gradual"))


def paired_difference(suite: dict, method: str, other: str) -> dict | None:
  """How much better ``method`` is than ``other`` (accuracy points, or bits per byte
  saved), paired by seed (same data order): mean, std over seeds and the per-seed
  values; None when either is missing."""
  metric = metric_of(suite)
  a = {r["seed"]: r[metric.key] for r in suite["runs"].get(method, [])}
  b = {r["seed"]: r[metric.key] for r in suite["runs"].get(other, [])}
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return None
  d = np.array([metric.better(a[s], b[s]) * metric.scale for s in seeds])
  return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
          "n": len(d), "values": d.round(2).tolist()}


def map_cells(results: dict) -> list[dict]:
  """One record per suite: dataset/model, regime, severity, budget and the differences."""
  cells = []
  for name, suite in results["suites"].items():
    cfg = suite["config"]
    if not cfg.get("epochs"):
      continue
    rows, metric = summarize(suite), metric_of(suite)
    cells.append({
        "suite": name, "data": f"{cfg['dataset']}/{cfg['model']}", "regime": cfg["regime"],
        "severity": severity_name(cfg), "epochs": cfg["epochs"], "metric": metric.key,
        "dense": suite["dense"] * metric.scale,
        "accuracy": {m: {k: r[k] for k in ("mean", "std", "n")} for m, r in rows.items()},
        **{key: paired_difference(suite, method, other)
           for key, _, method, other in _DIFFERENCES}})
  return cells


def _fmt(d, digits=2):
  return ("-" if d is None else
          f"{d['mean']:+.{digits}f} +- {d['std']:.{digits}f} (n={d['n']})")


def _units(cells: list[dict]) -> tuple[str, int]:
  """What a map's differences are in, and their digits."""
  metric = METRICS[cells[0].get("metric", "test_accuracy")]
  if metric.higher_is_better:
    return "accuracy points", 2
  return f"{metric.unit} saved", 3


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
      units, digits = _units(sub)
      for key, title, _, _ in _DIFFERENCES:
        found = _differences(sub, regime, key, budgets, sevs)
        sign = "," if digits == 2 else ", positive: VCON better;"
        lines += [f"### {data}, {regime}: {title} ({units}{sign} mean +- std over "
                  f"seeds, paired by seed)", "",
                  "| severity | " + " | ".join(f"{b:g} epochs" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for i, sev in enumerate(sevs):
          row = [_fmt(found.get((i, j)), digits) for j in range(len(budgets))]
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
    units, digits = _units(sub)
    regimes = [r for r in _REGIMES if any(c["regime"] == r for c in sub)]
    fig, axes = plt.subplots(len(regimes), 2, figsize=(4 + 1.6 * len(budgets), 2.2 + 1.4 * len(sevs)),
                             squeeze=False)
    for i, regime in enumerate(regimes):
      for j, (key, title, _, _) in enumerate(_DIFFERENCES):
        ax = axes[i][j]
        found = _differences(sub, regime, key, budgets, sevs)
        grid = np.full((len(sevs), len(budgets)), np.nan)
        for (row, col), d in found.items():
          grid[row, col] = d["mean"]
        floor = 1.0 if digits == 2 else 0.01
        lim = max(floor, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else floor)
        ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for (row, col), d in found.items():
          shown = digits - 1
          ax.text(col, row, f"{d['mean']:+.{shown}f}\n±{d['std']:.{shown}f}", ha="center",
                  va="center", fontsize=8)
        ax.set_xticks(range(len(budgets)), [f"{b:g} ep" for b in budgets])
        ax.set_yticks(range(len(sevs)), sevs)
        ax.set_title(f"{regime}: {title}", fontsize=9)
    fig.suptitle(f"{data}: {units} (blue: VCON better), mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"map_{data.replace('/', '_')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written
