"""Helpers shared by the train-step benchmarks (``bench_train_step``, ``bench_cost_curves``).

Timing is relative: every variant of a comparison lives in one process and is timed in
interleaved rounds (order shuffled each round), so drifts of the machine hit all alike.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import random
import time

import jax
import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def make_batch(shape, is_text, batch_size, num_classes=10, seed=0):
  """A fixed random batch ``{"inputs", "labels"}`` (token ids when ``is_text``)."""
  rng = np.random.RandomState(seed)
  if is_text:
    inputs = rng.randint(1, 200, (batch_size, *shape)).astype(np.int32)
  else:
    inputs = rng.rand(batch_size, *shape).astype(np.float32)
  return {"inputs": inputs, "labels": rng.randint(0, num_classes, batch_size)}


def memory_bytes(step, state, batch):
  """Peak bytes of the compiled step (arguments + outputs + temporaries - aliased)."""
  try:
    compiled = step._compiled(state).lower(  # pylint: disable=protected-access
        state, jax.device_put(batch, step.batch_sharding)).compile()
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def prepare(step, batch, warmup=3):
  """Initial state, compiled and warmed up, with the step's memory: a run for :func:`time_rounds`."""
  state = step.init()
  mem = memory_bytes(step, state, batch)
  for _ in range(warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  return {"step": step, "state": state, "times": [], "memory_bytes": mem}


def time_rounds(runs, batch, repeats, steps):
  """Appends to each run's ``times`` the mean step time of ``steps`` steps, per round."""
  for _ in range(repeats):
    order = list(runs)
    random.shuffle(order)
    for name in order:
      r = runs[name]
      state = r["state"]
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = r["step"](state, batch)
      jax.block_until_ready((state, metrics))
      r["times"].append((time.perf_counter() - t0) / steps)
      r["state"] = state


def summarize(runs, reference="plain"):
  """Median time, ratio to ``reference`` (median, min, max of per-round ratios), memory."""
  ref = np.array(runs[reference]["times"])
  ref_mem = runs[reference]["memory_bytes"]
  out = {}
  for name, r in runs.items():
    t = np.array(r["times"])
    ratios = t / ref
    out[name] = {"ms_median": 1e3 * float(np.median(t)),
                 "ratio_median": float(np.median(ratios)),
                 "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()),
                 "memory_bytes": r["memory_bytes"],
                 "memory_ratio": (r["memory_bytes"] / ref_mem
                                  if r["memory_bytes"] and ref_mem else None)}
  return out


def machine_meta(**extra):
  """Where and with what the numbers were measured."""
  return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
          # 1/5/15-minute load averages when the run started: near 0 on a quiet machine
          "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
          "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
          "jax": jax.__version__, **extra}


def write_results(out, payload, markdown):
  """Writes ``out``.json and ``out``.md, each atomically (temp file + rename); ``out`` has
  no extension."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  for suffix, text in ((".json", json.dumps(payload, indent=1)), (".md", markdown)):
    tmp = out.with_suffix(suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out.with_suffix(suffix))
