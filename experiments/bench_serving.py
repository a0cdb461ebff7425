"""Serving: latency and device memory of every export format in every runtime mode, and qwix.

    .venv/bin/python experiments/bench_serving.py                 # ~10 min on 2 CPU cores
    .venv/bin/python experiments/bench_serving.py --width 4096 --out experiments/results/bench_serving_gpu

Model: an NNX MLP ``width -> width -> width -> 10`` (two ``width x width`` kernels, the
issue's "2-layer 1024-wide MLP"), eval mode. Rows:

* ``dense fp32`` / ``dense bf16``: the plain model (params and compute in that dtype);
* the ``vj.export`` (post-shot state, beta = 0, no training: the formats, not the accuracy,
  are measured) of int8, int4 / int2 with a scale per 32 inputs (bfloat16 scales), binary,
  prune 90 %, 2:4 and low rank ``width / 16``, each run by
  ``vj.load_compressed(path).apply_fn(model, decode=mode)`` for ``once``, ``on_the_fly`` and
  ``native`` (``auto`` is one of those: the table says which);
* ``width 50 %``: ``vj.prune_units(0.5)`` + ``vj.shrink`` (every hidden layer half as wide;
  a smaller dense model, so one mode);
* ``qwix int8`` / ``qwix int4 g32``: qwix's own PTQ runtime (``qwix.quantize_model(model,
  qwix.PtqProvider(rules))``, weight-only, its own scales) on the same layer sizes, and
  ``qwix int4 g32 (ours)``: the same qwix model holding our int4 export (``vj.to_qwix``).

Measured per row and batch (1 and 256): median latency of a synchronous call after warm-up
(interleaved rounds, order shuffled each round, each measurement ``--target-ms`` of calls),
bytes held on the device between calls (the arrays the jitted function takes: weights,
their compact forms, model state; ``device_bytes()`` for ours), and the peak bytes of a call
(XLA's ``memory_analysis()``: arguments + outputs + temporaries), each against dense fp32.
Output: ``experiments/results/bench_serving.{md,json}``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vcon_jax as vj
from bench_common import RESULTS, write_results
from vcon_jax.export import runtime

MODES = ("once", "on_the_fly", "native")


class MLP(nnx.Module):
  def __init__(self, width, hidden=None, dtype=jnp.float32, *, rngs):
    hidden = hidden or (width, width)
    dims = (width, *hidden)
    self.layers = nnx.List([nnx.Linear(i, o, param_dtype=dtype, dtype=dtype, rngs=rngs)
                            for i, o in zip(dims[:-1], dims[1:])])
    self.head = nnx.Linear(dims[-1], 10, param_dtype=dtype, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


def formats(width):
  g = dict(group_size=32, scale_dtype=jnp.bfloat16)
  return {
      "int8": vj.quantize(8),
      "int4 g32": vj.quantize(4, **g),
      "int2 g32": vj.quantize(2, **g),
      "binary": vj.binarize(),
      "prune 90 %": vj.prune(sparsity=0.9),
      "2:4": vj.prune(n=2, m=4),
      f"low rank {width // 16}": vj.low_rank(rank=width // 16, exclude=r"head"),
  }


def _model(width, dtype=jnp.float32, hidden=None):
  m = MLP(width, hidden, dtype, rngs=nnx.Rngs(0))
  m.eval()
  return m


def _plain_fn(model):
  graph, state = nnx.split(model)
  jitted = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
  fn = lambda x: jitted(state, x)  # noqa: E731
  fn.lower = lambda x: jitted.lower(state, x)
  fn.held = sum(int(a.nbytes) for a in jax.tree.leaves(state))
  return fn


def _peak(fn, x):
  m = fn.lower(x).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _time(fn, x, iters):
  t0 = time.perf_counter()
  for _ in range(iters):
    fn(x).block_until_ready()
  return (time.perf_counter() - t0) / iters


def _qwix_rows(width, x, tmpdir, int4_path):
  import qwix
  rows = {}
  for name, qtype, tile in (("qwix int8", jnp.int8, None), ("qwix int4 g32", jnp.int4, 32)):
    rules = [qwix.QuantizationRule(module_path=r"layers/.*", weight_qtype=qtype,
                                   tile_size=tile)]
    rows[name] = _plain_fn(qwix.quantize_model(_model(width), qwix.PtqProvider(rules), x))
  rules = [qwix.QuantizationRule(module_path=r"layers/.*", weight_qtype=jnp.int4,
                                 tile_size=32)]
  qm = qwix.quantize_model(_model(width), qwix.PtqProvider(rules), x)
  vj.to_qwix(vj.load_compressed(int4_path), qm)
  rows["qwix int4 g32 (ours)"] = _plain_fn(qm)
  return rows


def build(width, x, tmpdir, log):
  """``{row: (fn, info)}`` for every row of the table."""
  rows = {"dense fp32": (_plain_fn(_model(width)), {"mode": "-"}),
          "dense bf16": (_plain_fn(_model(width, jnp.bfloat16)), {"mode": "-"})}
  paths = {}
  for name, transform in formats(width).items():
    t0 = time.perf_counter()
    model = _model(width)
    step = vj.make_train_step(model, transform, vj.linear_vanish(0), optax.sgd(0.0))
    path = os.path.join(tmpdir, f"{name.replace(' ', '_').replace('%', 'pc')}.npz")
    file_rows = vj.export(step.init(model), path, model=step.model)
    paths[name] = path
    log(f"  export {name}: {time.perf_counter() - t0:.1f} s, file "
        f"{file_rows.totals['compressed_bytes'] / 2**20:.2f} MiB")
    for mode in MODES:
      compact = vj.load_compressed(path)  # one per mode: nothing decoded is shared
      fn = compact.apply_fn(_model(width), decode=mode)
      fn(x)
      fn.held = fn.device_bytes()
      rows[f"{name} ({mode})"] = (fn, {"mode": mode, "file_bytes":
                                       int(file_rows.totals["compressed_bytes"]),
                                       "native_layers": len(fn.native_layers),
                                       "thin_layers": len(fn.fast_layers)})
  # structured: half of every hidden layer's units removed, then a smaller dense model
  dense = _model(width)
  units = vj.find_units(dense, None, x)
  t = vj.prune_units(0.5, units=units)
  params = nnx.state(dense, nnx.Param).to_pure_dict()
  nnx.update(dense, vj.compress(t, params, t.init(params)))
  shrunk = vj.shrink(dense, units, example=x)
  rows["width 50 %"] = (_plain_fn(shrunk.module), {"mode": "-", "widths": shrunk.widths})
  for name, fn in _qwix_rows(width, x, tmpdir, paths["int4 g32"]).items():
    rows[name] = (fn, {"mode": "qwix"})
  return rows


def run(width, batches, repeats, target_s, log):
  xs = {b: jax.device_put(np.random.RandomState(b).rand(b, width).astype(np.float32))
        for b in batches}
  with tempfile.TemporaryDirectory() as tmpdir:
    rows = build(width, xs[batches[0]], tmpdir, log)
  timed, out = {}, {}
  for name, (fn, info) in rows.items():
    out[name] = dict(info, held_bytes=int(fn.held), batches={})
    for b in batches:
      xb = xs[b] if not name.startswith("dense bf16") else xs[b].astype(jnp.bfloat16)
      fn(xb).block_until_ready()
      warm = _time(fn, xb, 2)
      timed[name, b] = {"fn": fn, "x": xb, "times": [],
                        "iters": int(np.clip(round(target_s / max(warm, 1e-6)), 1, 2000))}
      out[name]["batches"][str(b)] = {"peak_bytes": _peak(fn, xb)}
  for r in range(repeats):
    order = list(timed)
    random.shuffle(order)
    for key in order:
      t = timed[key]
      t["times"].append(_time(t["fn"], t["x"], t["iters"]))
    log(f"  round {r + 1}/{repeats}")
  for (name, b), t in timed.items():
    ref = np.array(timed["dense fp32", b]["times"])
    times = np.array(t["times"])
    out[name]["batches"][str(b)].update(
        ms_median=1e3 * float(np.median(times)),
        ratio_median=float(np.median(times / ref)), ratio_min=float((times / ref).min()),
        ratio_max=float((times / ref).max()), iters=t["iters"],
        ms_rounds=[1e3 * float(v) for v in times])
  return out


def to_markdown(res, meta):
  width, rows = meta["width"], res
  dense_held = rows["dense fp32"]["held_bytes"]
  load = meta["loadavg_start"]
  lines = [
      f"# Serving: every format in every runtime mode ({meta['device']})", "",
      f"Measured on {meta['machine']}: jax {meta['jax']} ({meta['platform']}, "
      f"{meta['device']}), flax {meta['flax']}, qwix {meta['qwix']}. Load average at start "
      f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, at end {meta['loadavg_end'][0]:.2f}"
      f"{' (**shared machine**: absolute times inflated; ratios are the reliable part)' if meta['shared'] else ' (quiet machine)'};"
      f" {meta['runtime_s']:.0f} s. `decode=\"auto\"` on this backend runs "
      f"**{meta['auto']}**.", "",
      f"Model: NNX MLP {width} -> {width} -> {width} -> 10 (two {width} x {width} kernels; "
      f"dense fp32 {dense_held / 2**20:.2f} MiB). held = bytes on the device between calls "
      f"(the arrays the jitted call takes), peak = XLA's memory analysis of one call "
      f"(arguments + outputs + temporaries), both / dense fp32 at that batch; time = median "
      f"latency of a synchronous call / dense fp32 (median of {meta['repeats']} interleaved "
      f"rounds, min..max in the JSON). Exports are of post-shot states (formats, not "
      f"accuracy). qwix rows: qwix {meta['qwix']}'s PTQ runtime, weight-only.", "",
      "| format | mode | held | " + " | ".join(
          f"b={b} ms | b={b} time | b={b} peak" for b in meta["batches"]) + " |",
      "|---|---|---|" + "---|---|---|" * len(meta["batches"])]
  for name, r in rows.items():
    label = name.split(" (")[0] if r["mode"] not in ("-", "qwix") else name
    cells = [label, r["mode"], f"{r['held_bytes'] / dense_held:.3f}"]
    for b in meta["batches"]:
      s = r["batches"][str(b)]
      dense_peak = rows["dense fp32"]["batches"][str(b)]["peak_bytes"]
      cells += [f"{s['ms_median']:.3f}", f"{s['ratio_median']:.2f}",
                f"{s['peak_bytes'] / dense_peak:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--target-ms", type=float, default=50.0)
  ap.add_argument("--out", default=str(RESULTS / "bench_serving"))
  args = ap.parse_args(argv)
  import flax
  import qwix
  start, load, dev = time.perf_counter(), os.getloadavg(), jax.devices()[0]
  meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
          "platform": dev.platform, "device": dev.device_kind, "jax": jax.__version__,
          "flax": flax.__version__, "qwix": getattr(qwix, "__version__", "?"),
          "width": args.width, "batches": args.batches, "repeats": args.repeats,
          "loadavg_start": list(load), "shared": load[0] > 1.5,
          "auto": runtime.auto_decode()}
  res = run(args.width, args.batches, args.repeats, args.target_ms / 1e3,
            lambda s: print(s, flush=True))
  meta["loadavg_end"], meta["runtime_s"] = list(os.getloadavg()), time.perf_counter() - start
  md = to_markdown(res, meta)
  write_results(args.out, {"meta": meta, "results": res}, md)
  print(md)


if __name__ == "__main__":
  main()
