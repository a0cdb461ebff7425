"""Train-step overhead of VCON against plain fine-tuning, measured in one process.

    .venv/bin/python experiments/bench_train_step.py            # all models, ~10 min on 2 CPU cores
    .venv/bin/python experiments/bench_train_step.py --models mlp1024 --repeats 7

For every model the plain step (``vj.identity()``, the same harness without compression),
the VCON step per transform (weight-space blend, one forward pass) and the naive form
(``blend='outputs'``: dense and compressed passes, logits blended) are compiled, then timed
in interleaved rounds (variant order shuffled each round) so drifts of the machine hit all
of them alike. Reported: median step time over rounds, the ratio to plain with its spread
(min..max over rounds of the per-round ratio), and the compiled executable's temp memory.
Output: ``experiments/results/bench_train_step.{md,json}`` (see ``--out``).
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

#: name -> (model kwargs for get_model, input shape without batch, is_text, batch size)
MODELS = {
    # the reference case: 3 x 1024 MLP at batch 256
    "mlp1024": (dict(name="mlp", in_features=784, hidden=(1024, 1024, 1024),
                     num_classes=10), (784,), False, 256),
    "mlp": (dict(name="mlp"), (784,), False, 128),
    # the experiments' models (vcon_experiments/config.py DATASET_DEFAULTS)
    "cnn": (dict(name="cnn", features=(16, 32), hidden=64), (28, 28, 1), False, 128),
    "vit": (dict(name="vit"), (28, 28, 1), False, 128),
    "transformer": (dict(name="transformer", max_len=48, dim=64, depth=2, heads=4,
                         mlp_dim=128), (48,), True, 64),
}


def transforms(low_rank: int):
  return {
      "prune": vj.prune(sparsity=0.9),
      "prune/16": vj.prune(sparsity=0.9, update_every=16),
      "binarize": vj.binarize(),
      "quantize4": vj.quantize(bits=4),
      # the 10/45-class heads and the first conv/patch projections are thinner than r
      f"low_rank{low_rank}": vj.low_rank(rank=low_rank,
                                         exclude=r"head|patch_proj|convs/0/"),
  }


def bench_model(key, repeats, steps, devices, low_rank):
  kwargs, shape, is_text, batch_size = MODELS[key]
  kwargs = dict(kwargs)
  name = kwargs.pop("name")
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  variants = {"plain": (vj.identity(), "weights")}
  for tname, t in transforms(low_rank).items():
    variants[tname] = (t, "weights")
    if tname in ("prune", "binarize", f"low_rank{low_rank}"):
      variants[f"{tname} (naive, 2 passes)"] = (t, "outputs")
  num_classes = 45 if is_text else 10
  batch = make_batch(shape, is_text, batch_size, num_classes)
  runs = {}
  for vname, (t, blend) in variants.items():
    model = get_model(name, rngs=nnx.Rngs(0), **kwargs)
    step = vj.make_train_step(model, t, vj.linear_vanish(10 ** 9), optax.adamw(1e-4),
                              parallel=vj.Parallel(mesh=mesh), blend=blend)
    runs[vname] = prepare(step, batch)
  time_rounds(runs, batch, repeats, steps)
  return summarize(runs)


def to_markdown(results, meta):
  lines = [f"Measured on {meta['machine']} ({meta['devices']} {meta['platform']} device(s)), "
           f"jax {meta['jax']}, {meta['repeats']} interleaved rounds x {meta['steps']} "
           f"steps; ratio = variant / plain step time (median, min..max over rounds). "
           f"Load average at start: {meta['load_average_at_start']}. {meta['note']}", ""]
  for model, rows in results.items():
    lines += [f"### {model}", "", "| variant | ms/step | ratio | spread | memory ratio |",
              "|---|---|---|---|---|"]
    for vname, r in rows.items():
      mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "n/a"
      lines.append(f"| {vname} | {r['ms_median']:.2f} | {r['ratio_median']:.3f} | "
                   f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f} | {mem} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                      help="models to measure (default: all)")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=10, help="steps per round and variant")
  parser.add_argument("--devices", type=int, nargs="+", default=[1],
                      help="data-parallel device counts to measure (forced CPU devices: set "
                           "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  parser.add_argument("--low-rank", type=int, default=32, help="rank of the low-rank variant")
  parser.add_argument("--note", default="",
                      help="how the machine was, e.g. 'quiet machine: no other process running'")
  parser.add_argument("--out", default=str(RESULTS / "bench_train_step"),
                      help="output path without extension (.md and .json are written)")
  args = parser.parse_args(argv)
  for d in args.devices:
    if d > jax.device_count():
      parser.error(f"--devices {d}: only {jax.device_count()} device(s) visible.")
  meta = machine_meta(repeats=args.repeats, steps=args.steps, note=args.note)
  results = {}
  for d in args.devices:
    for key in args.models:
      label = key if len(args.devices) == 1 else f"{key} on {d} device(s)"
      print(f"measuring {label} ...", flush=True)
      results[label] = bench_model(key, args.repeats, args.steps, d, args.low_rank)
      for vname, r in results[label].items():
        print(f"  {vname:28s} {r['ms_median']:8.2f} ms  x{r['ratio_median']:.3f}", flush=True)
  meta["devices"] = ",".join(map(str, args.devices))
  write_results(args.out, {"meta": meta, "results": results}, to_markdown(results, meta))
  print(to_markdown(results, meta))


if __name__ == "__main__":
  main()
