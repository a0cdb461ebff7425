"""Cost curves: VCON step overhead and peak memory against layer width and batch size.

    .venv/bin/python experiments/bench_cost_curves.py            # ~10 min on 2 CPU cores
    .venv/bin/python experiments/bench_cost_curves.py --quick    # ~1 min, a smoke run

The model is a one-hidden-layer MLP ``width -> width -> 10`` (so the ``width x width``
kernel dominates). Two sweeps: width 256..8192 at batch 256, and batch 32..1024 at width
1024. At each point the plain step (``vj.identity()``) and the VCON step of every
transform (prune 90 %, binarize, quantize 4 bits, low rank 8 and 32; weight-space blend)
are compiled in one process and timed in interleaved rounds (see ``bench_common``); the
ratio is variant / plain step time (median over rounds), the memory the compiled step's
peak bytes (``memory_analysis``). Large widths get fewer steps per round so one run stays
near 10 minutes. The low-rank ratio is drawn against its arithmetic bound ``1 + r / B``:
the blend forms ``A @ B`` (``2 r d^2`` flops) next to the layer's ``2 B d^2``.

Output: ``experiments/results/cost_curves.{md,json}`` and one
``experiments/results/cost_curves_<transform>.png`` per transform (see ``--out``).
"""

from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx

import vcon_jax as vj
from vcon_experiments.models import get_model

from bench_common import (RESULTS, machine_meta, make_batch, prepare, summarize,
                          time_rounds, write_results)

WIDTHS = (256, 512, 1024, 2048, 4096, 8192)
BATCHES = (32, 64, 128, 256, 512, 1024)
BATCH_AT_WIDTH_SWEEP = 256
WIDTH_AT_BATCH_SWEEP = 1024


def transforms() -> dict:
  # the 10-class head is thinner than the ranks: low rank leaves it dense
  return {
      "prune": vj.prune(sparsity=0.9),
      "binarize": vj.binarize(),
      "quantize4": vj.quantize(bits=4),
      "low_rank8": vj.low_rank(rank=8, exclude="head"),
      "low_rank32": vj.low_rank(rank=32, exclude="head"),
  }


def _rounds(width, batch, quick):
  """(repeats, steps per round): about the same wall time per point."""
  if quick:
    return 2, 1
  work = width * width * batch / (1024 * 1024 * 256)  # relative to width 1024, batch 256
  if work >= 16:
    return 3, 1
  if work >= 4:
    return 4, 2
  return 5, 5


def bench_point(width, batch_size, quick):
  """Ratios and memory of every transform at one (width, batch)."""
  batch = make_batch((width,), False, batch_size)
  variants = {"plain": vj.identity(), **transforms()}
  runs = {}
  for name, t in variants.items():
    model = get_model("mlp", in_features=width, hidden=(width,), num_classes=10,
                      rngs=nnx.Rngs(0))
    step = vj.make_train_step(model, t, vj.linear_vanish(10 ** 9), optax.adamw(1e-4))
    runs[name] = prepare(step, batch, warmup=1 if quick else 2)
  repeats, steps = _rounds(width, batch_size, quick)
  time_rounds(runs, batch, repeats, steps)
  out = summarize(runs)
  for name in out:
    out[name].update(width=width, batch=batch_size, repeats=repeats, steps=steps)
  return out


def _bound(name, batch):
  return 1.0 + int(name.removeprefix("low_rank")) / batch if name.startswith("low_rank") \
      else None


def plot(results, out_prefix):
  """One PNG per transform: ratio vs width, ratio vs batch, peak memory vs width."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  paths = []
  for name in transforms():
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, sweep, key in ((axes[0], "width", "width"), (axes[1], "batch", "batch")):
      pts = [p[name] for p in results[sweep]]
      xs = [p[key] for p in pts]
      ax.errorbar(xs, [p["ratio_median"] for p in pts],
                  yerr=[[p["ratio_median"] - p["ratio_min"] for p in pts],
                        [p["ratio_max"] - p["ratio_median"] for p in pts]],
                  marker="o", capsize=3, label=f"{name} / plain (median, min..max)")
      if name.startswith("low_rank"):
        ax.plot(xs, [_bound(name, p["batch"]) for p in pts], "k--", marker="x",
                label="1 + r / B")
      ax.axhline(1.0, color="grey", lw=0.8)
      ax.axhline(1.05, color="grey", lw=0.8, ls=":")
      ax.set_xscale("log", base=2)
      ax.set_xlabel("layer width" if sweep == "width" else "batch size")
      ax.set_ylabel("step time ratio")
      ax.set_title(f"batch {BATCH_AT_WIDTH_SWEEP}" if sweep == "width"
                   else f"width {WIDTH_AT_BATCH_SWEEP}")
      ax.legend(fontsize=7)
    pts = results["width"]
    xs = [p[name]["width"] for p in pts]
    for label in ("plain", name):
      axes[2].plot(xs, [(p[label]["memory_bytes"] or 0) / 2 ** 20 for p in pts], marker="o",
                   label=label)
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("layer width")
    axes[2].set_ylabel("peak memory of the step (MiB)")
    axes[2].set_title(f"batch {BATCH_AT_WIDTH_SWEEP}")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"VCON {name}: cost against plain fine-tuning")
    fig.tight_layout()
    path = f"{out_prefix}_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def to_markdown(results, meta):
  lines = [f"Measured on {meta['machine']} ({meta['platform']}), jax {meta['jax']}; load "
           f"average at start {meta['load_average_at_start']}. "
           f"{meta['note']}", "",
           "Ratio = VCON step / plain step time (median over interleaved rounds, min..max); "
           "memory = compiled peak bytes of the VCON step / the plain step's.", ""]
  for sweep, fixed in (("width", f"batch {BATCH_AT_WIDTH_SWEEP}"),
                       ("batch", f"width {WIDTH_AT_BATCH_SWEEP}")):
    names = list(transforms())
    lines += [f"### against {sweep} ({fixed})", "",
              f"| {sweep} | plain ms | " + " | ".join(names) + " | 1 + 8/B | 1 + 32/B |",
              "|---" * (len(names) + 4) + "|"]
    for p in results[sweep]:
      cells = []
      for n in names:
        r = p[n]
        mem = f", mem x{r['memory_ratio']:.2f}" if r["memory_ratio"] else ""
        cells.append(f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}"
                     f"{mem})")
      b = p["plain"]["batch"]
      lines.append(f"| {p['plain'][sweep]} | {p['plain']['ms_median']:.1f} | "
                   + " | ".join(cells) + f" | {1 + 8 / b:.3f} | {1 + 32 / b:.3f} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
  parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: widths <= 1024, 2 rounds of 1 step")
  parser.add_argument("--note", default="",
                      help="said in the .md under the machine line (e.g. 'quiet machine: no "
                           "other process running')")
  parser.add_argument("--out", default=str(RESULTS / "cost_curves"),
                      help="output path without extension (.md, .json, _<transform>.png)")
  args = parser.parse_args(argv)
  widths = [w for w in args.widths if w <= 1024] if args.quick else args.widths
  meta = machine_meta(note=args.note, quick=args.quick)
  results = {"width": [], "batch": []}
  for sweep, points in (("width", [(w, BATCH_AT_WIDTH_SWEEP) for w in widths]),
                        ("batch", [(WIDTH_AT_BATCH_SWEEP, b) for b in args.batches])):
    for width, batch in points:
      print(f"{sweep} sweep: width {width}, batch {batch} ...", flush=True)
      point = bench_point(width, batch, args.quick)
      results[sweep].append(point)
      print("  " + "  ".join(f"{n} x{r['ratio_median']:.2f}" for n, r in point.items()
                             if n != "plain"), flush=True)
      jax.clear_caches()
  md = to_markdown(results, meta)
  write_results(args.out, {"meta": meta, "results": results}, md)
  plot(results, args.out)
  print(md)


if __name__ == "__main__":
  main()
