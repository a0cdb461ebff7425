"""What structured pruning buys where the model runs: shrunk models against dense.

    .venv/bin/python experiments/bench_shrink.py        # ~10 min on 2 CPU cores

For each model, ``vj.find_units`` finds the MLP units and attention heads (and, for the
MLP, every hidden layer's units), ``vj.prune_units(f)`` zeroes ``f`` of each group and
``vj.shrink`` removes them (its ``example=`` check passes: the shrunk model's outputs equal
the masked model's). Timed, all variants of a model in one process in interleaved rounds
(order shuffled each round): the jitted forward pass at batch 1 and 256 (LM: sequences of
64 bytes), and a plain AdamW train step at batch 256 (LM: 32 sequences of 64 bytes, as in
the LM map). Reported: median ms and the ratio to dense (median, min..max over rounds).

Models: the 3 x 1024 MLP on 784 inputs; the map's Fashion-MNIST ViT (width 64, 4 blocks,
4 heads, MLP 128, patches of 4); the LM map's causal LM (width 128, 4 blocks, GeGLU 384, 4
query heads sharing 1 key/value head, so only its MLP units are removable) and the same
LM with 4 key/value heads (heads removable too). Output:
``experiments/results/bench_shrink.{md,json}``. Run it on a quiet machine; the load
average at the start is recorded.
"""

from __future__ import annotations

import argparse
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vcon_jax as vj
from vcon_experiments.models import get_model

from bench_common import RESULTS, machine_meta, write_results

FRACTIONS = (0.25, 0.5, 0.75)
MODELS = {
    "MLP 3x1024": ("mlp", dict(in_features=784, hidden=(1024, 1024, 1024))),
    "ViT (map)": ("vit", dict(image_size=28, patch_size=4, in_channels=1, dim=64, depth=4,
                              heads=4, mlp_dim=128)),
    "LM (map, 1 kv head)": ("lm", dict(vocab_size=257, max_len=64, dim=128, depth=4,
                                       heads=4, kv_heads=1)),
    "LM, 4 kv heads": ("lm", dict(vocab_size=257, max_len=64, dim=128, depth=4, heads=4,
                                  kv_heads=4)),
}


def _inputs(kind, batch, seed=0):
  rng = np.random.RandomState(seed)
  if kind == "lm":
    return jnp.asarray(rng.randint(1, 257, (batch, 64)), jnp.int32)
  if kind == "vit":
    return jnp.asarray(rng.rand(batch, 28, 28, 1), jnp.float32)
  return jnp.asarray(rng.rand(batch, 784), jnp.float32)


def _labels(kind, x, seed=0):
  rng = np.random.RandomState(seed + 1)
  if kind == "lm":
    return jnp.asarray(rng.randint(0, 257, x.shape), jnp.int32)
  return jnp.asarray(rng.randint(0, 10, x.shape[0]), jnp.int32)


def _variants(kind, kwargs):
  """Dense and one shrunk model per fraction, with their widths."""
  dense = get_model(kind, **kwargs)
  dense.eval()
  example = _inputs(kind, 2)
  units = vj.find_units(dense, None, example)
  out = {"dense": (dense, None)}
  for f in FRACTIONS:
    model = nnx.clone(dense)
    t = vj.prune_units(f, units=units)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    nnx.update(model, vj.compress(t, params, t.init(params)))
    shrunk = vj.shrink(model, units, example=example)
    out[f"{int(f * 100)} % removed"] = (shrunk.module, shrunk.widths)
  return out, units


def _forward(model):
  graph, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
  return lambda x: fn(state, x)


def _train_step(model, kind):
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)

  def loss_fn(p, x, y):
    logits = nnx.merge(graph, p, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, opt, x, y):
    g = jax.grad(loss_fn)(p, x, y)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt

  box = {"p": params, "opt": opt}

  def run(x, y):
    box["p"], box["opt"] = step(box["p"], box["opt"], x, y)
    return box["p"]
  return run


def _time(fns, args, repeats, calls):
  """Median seconds per call of each fn, interleaved rounds; per-round times kept."""
  times = {k: [] for k in fns}
  for fn in fns.values():  # compile and warm up
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  for _ in range(repeats):
    order = list(fns)
    random.shuffle(order)
    for k in order:
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fns[k](*args)
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / calls)
  return times


def _summary(times):
  ref = np.array(times["dense"])
  return {k: {"ms_median": 1e3 * float(np.median(t)),
              "ratio_median": float(np.median(np.array(t) / ref)),
              "ratio_min": float(np.min(np.array(t) / ref)),
              "ratio_max": float(np.max(np.array(t) / ref))} for k, t in times.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--models", nargs="*", default=list(MODELS))
  ap.add_argument("--out", default=str(RESULTS / "bench_shrink"))
  args = ap.parse_args()
  meta = machine_meta(repeats=args.repeats, fractions=list(FRACTIONS))
  results = {}
  for name in args.models:
    kind, kwargs = MODELS[name]
    variants, units = _variants(kind, kwargs)
    row = {"groups": [g.describe()[:120] for g in units.groups],
           "widths": {k: w for k, (_, w) in variants.items() if w is not None}}
    for batch in (1, 256):
      x = _inputs(kind, batch)
      fns = {k: _forward(m) for k, (m, _) in variants.items()}
      row[f"forward batch {batch}"] = _summary(_time(fns, (x,), args.repeats,
                                                     20 if batch == 1 else 3))
    xb = _inputs(kind, 32 if kind == "lm" else 256)
    yb = _labels(kind, xb)
    fns = {k: _train_step(m, kind) for k, (m, _) in variants.items()}
    row["train step batch 256" if kind != "lm" else "train step 32 x 64"] = _summary(
        _time(fns, (xb, yb), args.repeats, 3))
    results[name] = row
    print(name, {k: {v: round(s["ratio_median"], 3) for v, s in r.items()}
                 for k, r in row.items() if isinstance(r, dict) and k != "widths"}, flush=True)
  write_results(args.out, {"meta": meta, "results": results}, _markdown(meta, results))


def _markdown(meta, results):
  lines = ["# Shrunk models against dense (structured pruning: vj.prune_units + vj.shrink)",
           "", f"Machine: {meta['machine']} ({meta['platform']}), jax {meta['jax']}, load "
           f"average at start {meta['load_average_at_start']}; {meta['repeats']} "
           "interleaved rounds; ratio = shrunk / dense time (median, min..max over "
           "rounds). Command: `.venv/bin/python experiments/bench_shrink.py`.", ""]
  for name, row in results.items():
    lines += [f"## {name}", "", "Unit groups: " + "; ".join(row["groups"]), ""]
    cols = [k for k in row if k not in ("groups", "widths")]
    lines += ["| variant | widths (old -> new per group) | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for v in row[cols[0]]:
      w = row["widths"].get(v)
      ws = "-" if w is None else ", ".join(f"{a}->{b}" for a, b in w[:4]) + \
          (" ..." if len(w) > 4 else "")
      cells = [f"{row[c][v]['ms_median']:.2f} ms ({row[c][v]['ratio_median']:.2f}x, "
               f"{row[c][v]['ratio_min']:.2f}..{row[c][v]['ratio_max']:.2f})" for c in cols]
      lines.append(f"| {v} | {ws} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
