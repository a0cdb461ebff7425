"""Inference latency and throughput of dense vs compressed (exported) models, in one process.

    .venv/bin/python experiments/bench_inference.py            # ~5 min on 2 CPU cores
    .venv/bin/python experiments/bench_inference.py --widths 256 1024 --batches 1 256 --repeats 7

Model: the library's NNX MLP ``784 -> width -> width -> 10`` (``vcon_experiments.models`` ``mlp``,
``hidden=(width, width)``), in eval mode. Variants per width:

* ``dense fp32``: the plain model, ``nnx.split`` once and ``jax.jit(merge(...)(x))`` over
  its fp32 params (passed as arguments, as the compressed arrays are);
* the compact exports (``vj.export`` of a post-shot state, beta = 0, no training) of
  ``prune(0.9)``, ``binarize()``, ``quantize(4)``, ``quantize(8)`` and
  ``low_rank(width // 16)`` (the 10-class head excluded: it is thinner than the rank), each
  run by ``vj.load_compressed(path).apply_fn(model, decode=...)`` in both decode modes
  (``--decode`` to pick): ``(once)``, the packed integer / bit / sparse arrays decoded to
  dense fp32 arrays kept on the device at the first call, then the plain dense model;
  ``(on the fly)``, one ``jit`` that decodes them from the packed arrays in every call.
  Low-rank Linear layers run as ``(x @ A) @ B`` in both.

The low-rank factors of kernels 2048 wide or more on both sides come from a randomized
truncated SVD (``--exact-svd``: the library's ``vj.ops.svd_factors``, a full float64 SVD that
takes ~90 s for one 4096 x 4096 kernel on 2 cores); only their values differ (the best
rank-r approximation up to the randomized error), not the shapes or the inference cost.

Every (variant, batch size) function is compiled and warmed up, its iteration count set from
the warm-up time (``--target-ms`` of work per measurement, so fewer iterations for the wide
models), then all are timed in interleaved rounds (order shuffled each round, so drifts of
a shared machine hit all alike). Each call is waited for (``block_until_ready``): the
reported time is the latency of one synchronous batch. Reported: median ms per batch,
examples/s, the ratio to dense (median of the per-round ratios, min..max), the export's
bytes, the bytes of the arrays the jitted function runs on (held on the device), the first
call's time (decoding for ``once``, finding sparse positions for ``on the fly``, and the
compile), and the largest |logit difference| against the dense model run on the export's
decoded params (``CompressedModel.params()``), a check that the compact path computes the
same function. Output: ``experiments/results/bench_inference.{md,json}`` (see ``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time

import jax
import numpy as np
import optax
from flax import nnx

import vcon_jax as vj
from bench_common import RESULTS, write_results
from vcon_jax import _low_rank
from vcon_experiments.models import get_model

IN_FEATURES, NUM_CLASSES = 784, 10
DENSE = "dense fp32"
MODES = {"once": "once", "on_the_fly": "on the fly"}


def variants(width: int) -> dict:
  rank = max(1, width // 16)
  return {
      "prune90": vj.prune(sparsity=0.9),
      "binarize": vj.binarize(),
      "quantize4": vj.quantize(bits=4),
      "quantize8": vj.quantize(bits=8),
      f"low_rank{rank}": vj.low_rank(rank=rank, exclude=r"head"),
  }


def _randomized_svd_factors(w, rank: int, oversample: int = 10, power_iters: int = 2):
  """``vj.ops.svd_factors`` (same ``A = U sqrt(S)``, ``B = sqrt(S) V^T`` split) from a randomized
  range finder (Halko et al. 2011) for wide kernels; the library's exact SVD otherwise."""
  fan_in, fan_out = int(np.prod(w.shape[:-1])), int(w.shape[-1])
  if min(fan_in, fan_out) < 2048:
    return _EXACT_SVD(w, rank)
  mat = np.asarray(w, np.float32).reshape(fan_in, fan_out)
  k = min(rank + oversample, fan_in, fan_out)
  q, _ = np.linalg.qr(mat @ np.random.RandomState(0).standard_normal((fan_out, k))
                      .astype(np.float32))
  for _ in range(power_iters):
    q, _ = np.linalg.qr(mat.T @ q)
    q, _ = np.linalg.qr(mat @ q)
  u_small, s, vt = np.linalg.svd((q.T @ mat).astype(np.float64), full_matrices=False)
  u = q.astype(np.float64) @ u_small
  root = np.sqrt(s[:rank])
  a = (u[:, :rank] * root).astype(w.dtype)
  b = (root[:, None] * vt[:rank]).astype(w.dtype)
  return jax.numpy.asarray(a), jax.numpy.asarray(b)


_EXACT_SVD = _low_rank.svd_factors


def _model(width: int):
  model = get_model("mlp", rngs=nnx.Rngs(0), in_features=IN_FEATURES, hidden=(width, width),
                    num_classes=NUM_CLASSES)
  model.eval()
  return model


def _dense_fn(model):
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return lambda x: jitted(state, x)


def _time(fn, x, iters):
  t0 = time.perf_counter()
  for _ in range(iters):
    fn(x).block_until_ready()
  return (time.perf_counter() - t0) / iters


def bench_width(width, batches, repeats, target_s, tmpdir, log, modes=tuple(MODES)):
  xs = {b: jax.device_put(np.random.RandomState(b).rand(b, IN_FEATURES).astype(np.float32))
        for b in batches}
  fns = {DENSE: _dense_fn(_model(width))}
  info = {DENSE: {"export_s": None, "fast_layers": [], "max_abs_diff": 0.0}}
  dense_bytes = sum(int(np.asarray(v).nbytes)
                    for v in jax.tree.leaves(nnx.state(_model(width), nnx.Param)))
  info[DENSE].update(bytes=dense_bytes, dense_bytes=dense_bytes, bytes_ratio=1.0,
                     layer_bytes_ratio=1.0, formats=["float32"], device_bytes=dense_bytes,
                     decode=None)
  first = {}
  for base, transform in variants(width).items():
    t0 = time.perf_counter()
    model = _model(width)
    step = vj.make_train_step(model, transform, vj.linear_vanish(0), optax.sgd(0.0))
    state = step.init(nnx.state(model, nnx.Param))
    path = os.path.join(tmpdir, f"w{width}_{base}.npz")
    rows = vj.export(state, path, model=step.model)
    export_s = time.perf_counter() - t0
    t = rows.totals
    formats = sorted({r["format"] for r in rows if r["transform"]})
    ref_fn = None
    for mode in modes:
      vname = f"{base} ({MODES[mode]})"
      compact = vj.load_compressed(path)  # one per mode: nothing decoded is shared
      fn = compact.apply_fn(_model(width), decode=mode)
      x0 = xs[min(batches)]
      t1 = time.perf_counter()
      fn(x0).block_until_ready()  # decoding (once) / positions (on the fly) + compile
      first[(vname, min(batches))] = time.perf_counter() - t1
      device_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(fn._arrays))
      # the same function? compact path vs the dense model on the decoded params
      if ref_fn is None:
        ref_model = _model(width)
        nnx.update(ref_model, compact.params(ref_model))
        ref_fn = _dense_fn(ref_model)
      xb = xs[max(batches)]
      diff = float(np.max(np.abs(np.asarray(fn(xb)) - np.asarray(ref_fn(xb)))))
      info[vname] = {"export_s": export_s, "fast_layers": compact.fast_layers,
                     "max_abs_diff": diff, "bytes": int(t["compressed_bytes"]),
                     "dense_bytes": int(t["dense_bytes"]), "bytes_ratio": float(t["ratio"]),
                     "layer_bytes_ratio": float(t["compressed_layers_ratio"]),
                     "file_bytes": t.get("file_bytes"), "formats": formats,
                     "device_bytes": device_bytes, "decode": mode}
      fns[vname] = fn
      log(f"  {vname:24s} export {export_s:6.1f} s  "
          f"{t['compressed_bytes'] / 2**20:7.2f} MiB ({t['ratio']:.4f} of dense), on device "
          f"{device_bytes / 2**20:7.2f} MiB  {', '.join(formats)}  max|diff| {diff:.2e}")
    del step, state, ref_fn
  runs = {}
  for vname, fn in fns.items():
    for b in batches:
      t0 = time.perf_counter()
      fn(xs[b]).block_until_ready()  # compile
      compile_s = first.get((vname, b), time.perf_counter() - t0)
      warm = _time(fn, xs[b], 2)
      iters = int(np.clip(round(target_s / max(warm, 1e-6)), 1, 1000))
      runs[(vname, b)] = {"fn": fn, "iters": iters, "compile_s": compile_s, "times": []}
  for _ in range(repeats):
    order = list(runs)
    random.shuffle(order)
    for key in order:
      r = runs[key]
      r["times"].append(_time(r["fn"], xs[key[1]], r["iters"]))
  out = {}
  for vname in fns:
    out[vname] = {k: v for k, v in info[vname].items()}
    out[vname]["batches"] = {}
    for b in batches:
      r = runs[(vname, b)]
      t = np.array(r["times"])
      ratios = t / np.array(runs[(DENSE, b)]["times"])
      ms = 1e3 * float(np.median(t))
      out[vname]["batches"][str(b)] = {
          "ms_median": ms, "examples_per_s": b / (ms / 1e3),
          "ratio_median": float(np.median(ratios)), "ratio_min": float(ratios.min()),
          "ratio_max": float(ratios.max()), "iters": r["iters"],
          "compile_s": r["compile_s"], "ms_rounds": [1e3 * float(v) for v in t]}
  return out


def _label(vname):
  if vname.startswith("low_rank"):
    return "low_rank r=w/16" + vname[vname.index(" "):] if " " in vname else "low_rank r=w/16"
  return vname


def _row(rows, label):
  return next(r for v, r in rows.items() if _label(v) == label)


def _mib(n):
  return f"{n / 2**20:.2f}"


def to_markdown(results, meta):
  load = meta["loadavg_start"]
  lines = [
      "# Inference latency: dense vs compressed (compact export)", "",
      f"Measured on {meta['machine']} (jax {meta['platform']} device: {meta['device_kind']}, "
      f"{meta['devices']} device(s); {meta['cores']} cores, {meta['cores_usable']} usable), "
      f"jax {meta['jax']}, flax {meta['flax']}. Load average at start "
      f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), at end "
      f"{meta['loadavg_end'][0]:.2f}; total runtime {meta['runtime_s']:.0f} s.", ""]
  if meta["shared"]:
    lines += [f"**The machine was shared**: its {meta['cores']} cores were also running "
              f"another experiment (1-min load average {load[0]:.2f} > 1.5 at start), so "
              f"absolute times are inflated and noisier than on an idle machine; the "
              f"interleaved rounds make the ratios the more reliable numbers.", ""]
  lines += [
      f"Model: NNX MLP {IN_FEATURES} -> width -> width -> {NUM_CLASSES} (eval mode). Every "
      f"compressed variant is the `vj.export` of a post-shot state (beta = 0) run by "
      f"`vj.load_compressed(path).apply_fn(model, decode=...)`: `(once)` decodes the "
      f"k-bit / binary / sparse layers to dense fp32 arrays kept on the device at the first "
      f"call, then runs the plain model; `(on the fly)` decodes them from the packed arrays "
      f"(sparse: values + sorted int32 positions) inside every jitted call; low-rank Linear "
      f"layers run as `(x @ A) @ B` in both. Dense fp32 is the plain jitted model. "
      f"{meta['repeats']} interleaved rounds (order shuffled per round), each measurement "
      f"about {meta['target_ms']:.0f} ms of calls (at least one), each call waited for. "
      f"ms = median per batch; ratio = variant / dense time (median of per-round ratios, "
      f"min..max); bytes = the export's arrays (`summary` totals, whole model incl. biases "
      f"and the uncompressed head where excluded); on device = bytes of the arrays the "
      f"jitted function runs on (transient decoded kernels inside a call not counted); "
      f"first call = decoding / sparse positions + compile at the smallest batch; "
      f"max|diff| = largest logit difference "
      f"against the dense model run on the export's decoded params. Low-rank factors: "
      f"{meta['svd']} (values only; shapes and cost as with the exact SVD).", ""]
  widths = list(results)
  if widths:
    batches = list(next(iter(results[widths[0]].values()))["batches"])
    labels = [_label(v) for v in results[widths[0]]]
    lines += ["## Ratio to dense (median time per batch), by batch size and width", "",
              "| variant | bytes of dense | on device of dense | " + " | ".join(
                  f"b={b} w={w}" for b in batches for w in widths) + " |",
              "|---|---|---|" + "---|" * (len(batches) * len(widths))]
    for label in labels[1:]:
      cells = [label, " / ".join(f"{_row(results[w], label)['bytes_ratio']:.3f}"
                                 for w in widths),
               " / ".join(f"{_row(results[w], label)['device_bytes'] / _row(results[w], label)['dense_bytes']:.3f}"
                          for w in widths)]
      cells += [f"{_row(results[w], label)['batches'][b]['ratio_median']:.2f}"
                for b in batches for w in widths]
      lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "(bytes / on device of dense: per width, in the order of the columns' "
              "widths.)", ""]
  for width, rows in results.items():
    batches = list(next(iter(rows.values()))["batches"])
    modes = [r["decode"] for r in rows.values() if r["decode"]]
    lines += [f"## width {width}", "",
              "| variant | bytes (MiB) | of dense | on device (MiB) | first call (s) | " +
              " | ".join(f"b={b} ms | b={b} ex/s | b={b} ratio" for b in batches) +
              " | max\\|diff\\| |",
              "|---|---|---|---|---|" + "---|---|---|" * len(batches) + "---|"]
    for vname, r in rows.items():
      cells = [vname, _mib(r["bytes"]), f"{r['bytes_ratio']:.3f}", _mib(r["device_bytes"]),
               f"{r['batches'][batches[0]]['compile_s']:.2f}"]
      for b in batches:
        s = r["batches"][b]
        ratio = (f"{s['ratio_median']:.2f} ({s['ratio_min']:.2f}..{s['ratio_max']:.2f})"
                 if vname != DENSE else "1")
        cells += [f"{s['ms_median']:.3f}", f"{s['examples_per_s']:,.0f}", ratio]
      cells.append(f"{r['max_abs_diff']:.1e}" if vname != DENSE else "-")
      lines.append("| " + " | ".join(cells) + " |")
    fmts = "; ".join(f"{v.split(' (')[0]}: {', '.join(r['formats'])}" + (
        f" (thin matmuls: {', '.join(r['fast_layers'])})" if r["fast_layers"] else "")
                     for v, r in rows.items() if v != DENSE and r["decode"] == modes[0])
    lines += ["", f"Formats: {fmts}.", ""]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 2048, 4096],
                      help="MLP hidden widths")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256],
                      help="batch sizes")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--decode", nargs="+", choices=list(MODES), default=list(MODES),
                      help="CompressedModel.apply_fn decode modes to run")
  parser.add_argument("--target-ms", type=float, default=40.0,
                      help="work per measurement: iterations = target / warm-up call time "
                           "(1..1000), so the wide models get fewer")
  parser.add_argument("--exact-svd", action="store_true",
                      help="low-rank factors from the library's exact SVD at every width "
                           "(slow: ~90 s per 4096 x 4096 kernel on 2 cores)")
  parser.add_argument("--out", default=str(RESULTS / "bench_inference"),
                      help="output path without extension (.md and .json are written)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  load = os.getloadavg()
  dev = jax.devices()[0]
  meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
          "platform": dev.platform, "device_kind": dev.device_kind,
          "devices": jax.device_count(), "cores": os.cpu_count(),
          "cores_usable": len(os.sched_getaffinity(0)), "jax": jax.__version__,
          "flax": __import__("flax").__version__, "repeats": args.repeats,
          "target_ms": args.target_ms, "widths": args.widths, "batches": args.batches,
          "decode": args.decode,
          "loadavg_start": list(load), "shared": load[0] > 1.5,
          "svd": "exact" if args.exact_svd else "randomized for kernels >= 2048 on both sides"}
  if not args.exact_svd:  # read by low_rank's init at call time
    _low_rank.svd_factors = _randomized_svd_factors
  results = {}
  try:
    with tempfile.TemporaryDirectory() as tmpdir:
      for width in args.widths:
        print(f"width {width} ...", flush=True)
        results[str(width)] = bench_width(width, args.batches, args.repeats,
                                          args.target_ms / 1e3, tmpdir,
                                          lambda s: print(s, flush=True), args.decode)
        for vname, r in results[str(width)].items():
          print(f"  {vname:24s} " + "  ".join(
              f"b={b}: {s['ms_median']:8.3f} ms x{s['ratio_median']:.2f}"
              for b, s in r["batches"].items()), flush=True)
  finally:
    _low_rank.svd_factors = _EXACT_SVD
  meta["loadavg_end"] = list(os.getloadavg())
  meta["runtime_s"] = time.perf_counter() - start
  md = to_markdown(results, meta)
  write_results(args.out, {"meta": meta, "results": results}, md)
  print(md)


if __name__ == "__main__":
  main()
