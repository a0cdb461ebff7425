"""Tables and plots of a comparison: mean +- std over seeds, share of the gap closed."""

from __future__ import annotations

import pathlib

import numpy as np

from vcon_jax.experiment.io import write_text_atomic


def gap_closed(method: float, post_shot: float, dense: float) -> float | None:
  """``(method - post-shot) / (dense - post-shot)``; None when there is no gap."""
  gap = dense - post_shot
  return None if abs(gap) < 1e-9 else (method - post_shot) / gap


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
              f"{suite['steps']} fine-tuning steps for every method; "
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
  from vcon_jax.experiment.io import write_json_atomic  # pylint: disable=import-outside-toplevel
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = {name: summarize(s) for name, s in results["suites"].items()}
  write_json_atomic(out_dir / "results.json", {**results, "summary": summary})
  write_text_atomic(out_dir / "table.md", markdown(results))
  write_text_atomic(out_dir / "headline.md", headline(results))
  pngs = plots(results, out_dir)
  return {"json": out_dir / "results.json", "table": out_dir / "table.md", "plots": pngs}
