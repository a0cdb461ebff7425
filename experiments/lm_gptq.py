"""GPTQ through ``qwix.contrib.gptq`` on the suite's pretrained LM (issue 32, item 3).

The post-training quantisation users run, with no training: the dense CausalLM the LM
runs start from is quantised weight-only (its attention and MLP projections; the
embedding and the tied output projection stay dense, as in every suite run) by

- qwix round-to-nearest (``qwix.PtqProvider``), and
- qwix GPTQ (``qwix.contrib.gptq``), its Hessians calibrated on ``--calibration-batches``
  training batches of the suite's LM batch size, in the order of the suite's data loader
  for that seed (``tasks.batch_at(train, step, batch_size, seed)``, steps 0 .. N-1),

and both are scored with the suite's test bits per byte (``tasks.bits_per_byte`` on the
first ``test_limit`` test texts, as every run's ``test_bpb``). Our own quantiser's RTN
(``vj.quantize``, the compressed start of the post-shot / VCON runs) is scored too, on
the same texts and on the first ``eval_examples`` (where the runs' own
``compressed_at_start`` is measured).

Each ``result.json`` (``runs/<data key>/same-task/e<epochs>/quantize<b>g<g>/gptq/
seed<k>/``) has ``test_bpb`` (GPTQ), ``compressed_at_start`` (our RTN measured as the
suite measures it for the runs: first ``eval_examples`` test texts, so that
``lm_recovered.py`` pairs alike with alike), ``rtn_ours_bpb`` (our RTN on the
``test_limit`` texts of ``test_bpb``), ``rtn_qwix_bpb`` (qwix RTN, same texts),
``dense_bpb``, ``calibration_batches`` and ``wall_s``. The recovered share should use
``rtn_ours_bpb`` (our RTN on the same texts as ``test_bpb``).

qwix's symmetric integer grid differs from ours: qwix scales by ``absmax / (2**(b-1) -
0.5)`` and rounds into ``[-2**(b-1), 2**(b-1) - 1]`` (int4: 16 levels, int2: 4), ours by
``absmax / (2**(b-1) - 1)`` into ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (int4: 15 levels,
int2: 3). Both are symmetric (no zero point); qwix has no option for ours. qwix
int3 is its synthetic ``"int3"`` qtype, which its PTQ supports but its GPTQ does not (a
TODO in ``gptq_core.quantize_weight``: the codes are stored in an array of dtype
``how.qtype``, which a string is not). For int3 this script gives GPTQ a ``jnp.int4``
array for the codes and keeps int3's grid (see ``_Int3Numpy``); int4 and int2 use JAX's
own ``jnp.int4`` / ``jnp.int2``.

Command (needs the dense LM of ``experiments/results/lm_baselines/run.sh`` in WORKDIR):
    .venv/bin/python experiments/lm_gptq.py --workdir /tmp/exp/w \
        --formats 4g128 4g32 3g32 2g32 --seeds 0 1 2
Time: about 2.6 min per (format, seed) on 2 CPU cores shared with two training
processes (measured at int4 g128, seed 0: 156 s, of which 120 s is GPTQ itself: qwix
runs its column loop eagerly, 28 layers), plus ~20 s to load; the whole grid (4 formats
x 3 seeds) about 35 min; 4 GB of memory. That run gave dense 1.7754, our RTN 1.8097,
qwix RTN 1.8059, GPTQ 1.7918 bits per byte.
``--dev`` runs the same code on a tiny random CausalLM and random bytes (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from qwix.contrib import gptq, gptq_core

import vcon_jax as vj
from vcon_experiments import compare, compressions, methods, pretrain, tasks, training
from vcon_experiments.config import load

HERE = pathlib.Path(__file__).resolve().parent
BASE_CONFIG = HERE / "results" / "lm_baselines" / "quantize4g128.json"
OUT = HERE / "results" / "lm_baselines" / "runs"
#: The CausalLM's projections (``blocks/i/attn/{query,key,value,out}``,
#: ``blocks/i/mlp/{gate,up,down}``): what ``vj.quantize``'s default selection compresses
#: in the suite. The embedding (and its tied output projection) is not matched.
LINEARS = r"blocks/\d+/(attn|mlp)/\w+"


class _Int3Numpy:
  """``jax.numpy`` as ``qwix.contrib.gptq_core`` sees it while GPTQ quantises to int3:
  its one use of the qtype as a dtype (``zeros_like(W, dtype=how.qtype)``, the array of
  codes) gets ``jnp.int4``, which holds int3's codes; the grid stays qwix's ``"int3"``."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def zeros_like(a, dtype=None, **kw):
    return jnp.zeros_like(a, dtype=jnp.int4 if dtype == "int3" else dtype, **kw)


@contextlib.contextmanager
def _gptq_int3():
  saved = gptq_core.jnp
  gptq_core.jnp = _Int3Numpy()
  try:
    yield
  finally:
    gptq_core.jnp = saved


def qtype(bits: int):
  """The qwix weight qtype of ``bits`` (int8, int4, int3, int2)."""
  return "int3" if bits == 3 else {8: jnp.int8, 4: jnp.int4, 2: jnp.int2}[bits]


def parse_format(fmt: str) -> tuple[int, int]:
  bits, group = fmt.split("g")
  return int(bits), int(group)


class _Eval:
  """What ``tasks.bits_per_byte`` needs of a train step (``evaluate``), for a plain or
  qwix-quantised NNX model passed as the state."""

  def __init__(self):
    self._fwd = nnx.jit(lambda m, x: m(x))

  def evaluate(self, model, batch, compressed=True):
    del compressed
    return self._fwd(model, jnp.asarray(batch["inputs"])), None


def quantize_rtn(model, rule, example):
  """qwix PTQ (round-to-nearest): the model with quantised projections."""
  return qwix.quantize_model(model, qwix.PtqProvider([rule]), example)


def quantize_gptq(model, rule, example, batches):
  """qwix GPTQ: Hessians from ``batches`` (token ids), then ``gptq.quantize_params``."""
  calib_rule = gptq.GptqRule(module_path=rule.module_path, weight_qtype=rule.weight_qtype,
                             tile_size=rule.tile_size)
  calib = qwix.quantize_model(model, gptq.GptqCalibrationProvider([calib_rule]), example)
  fwd = nnx.jit(lambda m, x: m(x))
  for x in batches:
    fwd(calib, jnp.asarray(x))
  stats = nnx.to_pure_dict(nnx.state(calib, qwix.QuantStat))
  if not jax.tree.leaves(stats):
    raise RuntimeError("GPTQ calibration collected no statistics (no layer matched).")
  ptq_model = quantize_rtn(model, rule, example)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with _gptq_int3() if rule.weight_qtype == "int3" else contextlib.nullcontext():
    quantized = gptq.quantize_params(params, ptq_model, stats)
  nnx.update(ptq_model, quantized)
  layers = {k[:k.index(next(p for p in k if str(p).endswith("_gptq"))) + 1]
            for k in flax.traverse_util.flatten_dict(stats)
            if any(str(p).endswith("_gptq") for p in k)}
  return ptq_model, len(layers)


def ours_rtn(cfg, model, params, train, test):
  """Our quantiser's RTN (the post-shot runs' compressed start): bpb on the first
  ``test_limit`` and on the first ``eval_examples`` test texts."""
  transform, schedule, _ = methods.build(cfg.replace(method="post-shot"), params, model,
                                         train[0][:2])
  step = vj.make_train_step(model, transform, schedule, optax.sgd(0.0),
                            loss_fn=tasks.token_loss)
  state = step.init()
  return (training.score(cfg, step, state, test),
          training.score(cfg, step, state, test, cfg.eval_examples))


def run_one(cfg, model, params, train, test, seed: int, n_calib: int,
            dense_bpb: float | None) -> dict:
  t0 = time.time()
  bits, group = cfg.bits, cfg.group_size
  rule = qwix.QuantizationRule(module_path=LINEARS, weight_qtype=qtype(bits),
                               tile_size=group)
  example = jnp.asarray(tasks.lm_batch(train[0][:2])["inputs"])
  ev = _Eval()
  rtn_model = quantize_rtn(model, rule, example)
  rtn_qwix = tasks.bits_per_byte(ev, rtn_model, test[0], cfg.test_limit)
  batches = [tasks.lm_batch(tasks.batch_at(train, s, cfg.batch_size, seed)["inputs"])
             ["inputs"] for s in range(n_calib)]
  t1 = time.time()
  gptq_model, n_layers = quantize_gptq(model, rule, example, batches)
  gptq_s = time.time() - t1
  gptq_bpb = tasks.bits_per_byte(ev, gptq_model, test[0], cfg.test_limit)
  rtn_ours, rtn_ours_eval = ours_rtn(cfg, model, params, train, test)
  return {"test_bpb": gptq_bpb, "compressed_at_start": rtn_ours_eval,
          "rtn_ours_bpb": rtn_ours, "rtn_qwix_bpb": rtn_qwix, "dense_bpb": dense_bpb,
          "calibration_batches": n_calib, "calibration_tokens": int(sum(
              (b != 0).sum() for b in batches)), "gptq_layers": n_layers,
          "bits": bits, "group_size": group, "qwix_qtype": getattr(qtype(bits), "__name__", str(qtype(bits))),
          "test_texts": min(cfg.test_limit or len(test[0]), len(test[0])),
          "rtn_eval_texts": cfg.eval_examples, "gptq_s": gptq_s,
          "wall_s": time.time() - t0, "qwix": qwix.__version__,
          "note": "test_bpb: qwix GPTQ; compressed_at_start: our RTN on the first "
                  "eval_examples test texts (as the runs' own); rtn_ours_bpb / "
                  "rtn_qwix_bpb: our / qwix RTN on the test_bpb texts."}


def run_dir(cfg, seed: int) -> pathlib.Path:
  comp = compressions.REGISTRY[cfg.compression].run_name(cfg.to_dict())
  return (OUT / compare.data_key(cfg) / cfg.regime / cfg.budget_name() / comp / "gptq" /
          f"seed{seed}")


def dev():
  """The whole path on a tiny random CausalLM and random bytes."""
  from vcon_experiments.models.lm import CausalLM  # pylint: disable=import-outside-toplevel
  cfg = load(BASE_CONFIG).replace(batch_size=8, test_limit=64, eval_examples=32)
  model = CausalLM(257, 16, dim=64, depth=2, heads=4, kv_heads=1, dtype="bfloat16",
                   rngs=nnx.Rngs(0))
  params = training.plain_step(model).init().params
  rng = np.random.default_rng(0)
  tok = rng.integers(1, 257, (256, 16)).astype(np.int32)
  train, test = (tok[:192], np.zeros(192)), (tok[192:], np.zeros(64))
  dense = tasks.bits_per_byte(_Eval(), model, test[0], cfg.test_limit)
  for fmt in ("4g32", "3g32", "2g32"):
    b, g = parse_format(fmt)
    r = run_one(cfg.replace(bits=b, group_size=g), model, params, train, test, 0, 4, dense)
    print(fmt, {k: r[k] for k in ("dense_bpb", "rtn_ours_bpb", "rtn_qwix_bpb", "test_bpb",
                                  "gptq_layers", "wall_s")}, flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="/tmp/exp/w")
  ap.add_argument("--formats", nargs="+", default=["4g128", "4g32", "3g32", "2g32"])
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  ap.add_argument("--calibration-batches", type=int, default=32)
  ap.add_argument("--force", action="store_true", help="redo finished runs")
  ap.add_argument("--dev", action="store_true", help="tiny random model, no workdir")
  args = ap.parse_args()
  if args.dev:
    return dev()
  base = load(BASE_CONFIG)
  root = pathlib.Path(args.workdir) / compare.data_key(base)
  dense = pretrain.pretrain_result(base, root)
  if dense is None:
    raise SystemExit(f"no finished dense LM in {root}/dense (result.json); run "
                     f"experiments/results/lm_baselines/run.sh first.")
  model, params = pretrain.dense_model(base, root)
  train, test = tasks.split(base, "train"), tasks.split(base, "test")
  dense_bpb = tasks.bits_per_byte(_Eval(), model, test[0], base.test_limit)
  print(f"dense: {dense_bpb:.4f} bpb here, {dense['test_bpb']:.4f} in its result.json",
        flush=True)
  for fmt in args.formats:
    bits, group = parse_format(fmt)
    cfg = base.replace(bits=bits, group_size=group)
    for seed in args.seeds:
      out = run_dir(cfg, seed)
      if (out / "result.json").exists() and not args.force:
        print(f"{out}: done", flush=True)
        continue
      result = run_one(cfg, model, params, train, test, seed, args.calibration_batches,
                       dense_bpb)
      out.mkdir(parents=True, exist_ok=True)
      (out / "config.json").write_text(json.dumps(
          {**cfg.replace(seed=seed).to_dict(), "method": "gptq (qwix.contrib.gptq)",
           "calibration_batches": args.calibration_batches}, indent=1, sort_keys=True))
      tmp = out / "result.json.tmp"
      tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
      tmp.replace(out / "result.json")
      print(f"{fmt} seed{seed}: RTN ours {result['rtn_ours_bpb']:.4f}, RTN qwix "
            f"{result['rtn_qwix_bpb']:.4f}, GPTQ {result['test_bpb']:.4f} bpb "
            f"({result['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
