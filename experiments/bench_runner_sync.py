"""A/B of the experiment runner's host sync, in the same code.

``sync`` reads the loss on the host after every step (what the runner did before it
tracked non-finite steps on the device), ``nosync`` is the runner as it is (reads metrics
every 10 steps). One ``vcon-jax compress`` run per call; per-step time is taken from the
difference of a 200- and a 1000-step run, which cancels start-up, compilation and the
final evaluation:

    for rep in 1 2 3; do for m in sync nosync; do
      python experiments/bench_runner_sync.py $m 200 $rep /tmp/ab_$m
      python experiments/bench_runner_sync.py $m 1000 $((rep+10)) /tmp/ab_$m
    done; done

(after one warm-up call per mode that pretrains in each workdir). Results:
``experiments/results/runner_sync.md``.
"""
import sys
import time

from vcon_experiments import cli, training

mode, steps, seed, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode == "sync":
  orig = training._first_bad
  def patched(first_bad, loss, done):
    float(loss)  # the per-step host read of the old loop
    return orig(first_bad, loss, done)
  training._first_bad = patched
t0 = time.time()
KW = '{"patch_size": 7, "dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128}'
args = ["compress", "--dataset", "fashion_mnist", "--model", "vit", "--batch-size", "128",
        "--train-limit", "15000", "--pretrain-steps", "50", "--compression", "prune",
        "--method", "vcon", "--no-progress", "--eval-examples", "500", "--model-kwargs", KW,
        "--steps", str(steps), "--eval-every", str(steps), "--checkpoint-every", str(steps),
        "--seed", seed, "--workdir", workdir]
try:
  cli.main(args)
except SystemExit:
  pass
print(f"RESULT {mode} steps={steps} seed={seed} wall={time.time() - t0:.2f}", flush=True)
