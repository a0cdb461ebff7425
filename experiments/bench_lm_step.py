"""Step cost of VCON on the suite's causal LM in bfloat16, side by side with qwix's QAT.

    .venv/bin/python experiments/bench_lm_step.py          # ~6 min on 2 CPU cores

The model is the LM map's (``vcon_experiments/presets/lm_map.json``: width 128, 4 blocks,
4 query heads sharing 1 key/value head, GeGLU 384, tied embedding) with bfloat16
params, at 64 sequences x 64 bytes = 4096 tokens a step, AdamW. Two paths, each with its
own plain step as the reference:

* ``make_train_step``: ``vj.identity()`` (plain) against VCON with every compression of
  the map (beta mid-transition, so the blend is computed);
* a user's own ``jax.jit`` step over ``nnx.split`` params: plain ``optax.adamw``, the
  same wrapped in ``vj.wrap_optax`` (int8, int4 g32), and qwix's QAT
  (``qwix.quantize_model`` with ``QtProvider``, weight-only int8, and int4 with
  ``tile_size=32``) on the same model and optimiser.

Every variant lives in one process and is timed in interleaved rounds (order shuffled
each round); reported: median ms per step and the ratio to the path's plain step
(median, min..max over rounds). Output: ``experiments/results/bench_lm_step.{md,json}``.
Run it on a quiet machine; the load average at the start is recorded.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vcon_jax as vj
from vcon_experiments import tasks
from vcon_experiments.models.lm import CausalLM

from bench_common import RESULTS, machine_meta, summarize, time_rounds, write_results

LM = dict(vocab_size=257, max_len=64, dim=128, depth=4, heads=4, kv_heads=1,
          param_dtype="bfloat16")
Q = 10 ** 6  # beta stays near 1 - t/Q > 0: the blend is computed in every timed step


def transforms():
  return {
      "int4 g32": vj.quantize(4, group_size=32),
      "int2 g32": vj.quantize(2, group_size=32),
      "binary": vj.binarize(),
      "rank 16": vj.low_rank(16),
      "prune 50%": vj.prune(0.5),
      "prune 2:4": vj.prune(n=2, m=4),
  }


def _batch(batch_size, seed=0):
  tokens = np.random.RandomState(seed).randint(1, 257, (batch_size, LM["max_len"]))
  return tasks.lm_batch(tokens.astype(np.int32))


def _train_step_runs(batch, warmup):
  runs = {}
  for name, t in {"plain": vj.identity(), **transforms()}.items():
    model = CausalLM(**LM, rngs=nnx.Rngs(0))
    step = vj.make_train_step(model, t, vj.linear_vanish(Q), optax.adamw(1e-4),
                              loss_fn=tasks.token_loss)
    state = step.init()
    for _ in range(warmup):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
    runs[name] = {"step": step, "state": state, "times": [], "memory_bytes": None}
  return runs


def _user_loop(model, tx, batch, warmup):
  """A user's own jitted step: ``(params, opt_state) -> same``, nnx.split / merge."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  @jax.jit
  def step(carry, batch):
    params, opt_state = carry

    def loss(p):
      return tasks.token_loss(nnx.merge(graphdef, p, rest)(batch["inputs"]), batch)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": value}

  carry = (params, opt_state)
  for _ in range(warmup):
    carry, _ = step(carry, batch)
  jax.block_until_ready(carry)
  return {"step": step, "state": carry, "times": [], "memory_bytes": None}


def _qwix_model(qtype, tile, example):
  import qwix  # pylint: disable=import-outside-toplevel
  rule = qwix.QtRule(module_path=r".*(attn|mlp).*", weight_qtype=qtype, tile_size=tile)
  return qwix.quantize_model(CausalLM(**LM, rngs=nnx.Rngs(0)), qwix.QtProvider([rule]),
                             example)


def _own_loop_runs(batch, warmup, with_qwix):
  runs = {"plain": _user_loop(CausalLM(**LM, rngs=nnx.Rngs(0)), optax.adamw(1e-4), batch,
                              warmup)}
  for name, t in (("vcon int8", vj.quantize(8)), ("vcon int4 g32", vj.quantize(4, group_size=32))):
    tx = vj.wrap_optax(optax.adamw(1e-4), t, vj.linear_vanish(Q))
    runs[name] = _user_loop(CausalLM(**LM, rngs=nnx.Rngs(0)), tx, batch, warmup)
  if with_qwix:
    x = jnp.asarray(batch["inputs"])
    for name, qtype, tile in (("qwix QAT int8", "int8", None), ("qwix QAT int4 g32", "int4", 32)):
      runs[name] = _user_loop(_qwix_model(qtype, tile, x), optax.adamw(1e-4), batch, warmup)
  return runs


def to_markdown(results, meta):
  lines = [f"Measured on {meta['machine']} ({meta['platform']}), jax {meta['jax']}, "
           f"{meta['repeats']} interleaved rounds x {meta['steps']} steps, "
           f"{meta['tokens_per_step']} tokens a step, bfloat16 params; ratio = variant / "
           f"the path's plain step (median, min..max over rounds). Load average at start: "
           f"{meta['load_average_at_start']}. {meta['note']}", ""]
  for path, rows in results.items():
    lines += [f"### {path}", "", "| variant | ms/step | ratio | spread |", "|---|---|---|---|"]
    for name, r in rows.items():
      lines.append(f"| {name} | {r['ms_median']:.1f} | {r['ratio_median']:.3f} | "
                   f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-qwix", action="store_true", help="leave qwix's rows out")
  parser.add_argument("--note", default="", help="a sentence for the results file")
  parser.add_argument("--out", default=str(RESULTS / "bench_lm_step"))
  args = parser.parse_args(argv)
  meta = machine_meta(repeats=args.repeats, steps=args.steps, note=args.note,
                      tokens_per_step=args.batch_size * LM["max_len"])
  batch = _batch(args.batch_size)
  results = {}
  for path, build in (("make_train_step", lambda: _train_step_runs(batch, args.warmup)),
                      ("own jitted step (wrap_optax, qwix)",
                       lambda: _own_loop_runs(batch, args.warmup, not args.no_qwix))):
    runs = build()
    time_rounds(runs, batch, args.repeats, args.steps)
    results[path] = summarize(runs)
    print(f"{path}: " + ", ".join(f"{k} {v['ratio_median']:.3f}"
                                  for k, v in results[path].items()), flush=True)
  write_results(args.out, {"meta": meta, "results": results}, to_markdown(results, meta))
  print(to_markdown(results, meta))


if __name__ == "__main__":
  main()
