#!/bin/bash
# usage: run.sh SHARD  (0 or 1) -- the VCON-defaults study on the LM's 0.04-epoch cells
cd "$(dirname "$0")/../../.."  # the repository (a worktree at a fixed commit)
PY=.venv/bin/python
for cell in prune2of4 quantize2g32; do
  for v in "--transition 0.2 --methods post-shot vcon" "--transition 0.5 --methods vcon" "--transition 0.1 --methods vcon" "--transition 0.2 --beta-schedule cosine --methods vcon"; do
    $PY -m vcon_experiments.cli compare --preset single --config experiments/results/lm_defaults_study/$cell.json $v --seeds 2 --workdir /tmp/lmstudy/w --out /tmp/lmstudy/out/$cell --shard $1/2 --no-progress
  done
done
