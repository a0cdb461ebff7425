#!/bin/bash
# usage: run.sh SHARD (0 or 1) [WORKDIR]: the field's LM baselines missing from lm_map and
# levers_study (issue 32 item 3), 0.04 epochs, 3 seeds: int4 g128 with every trained
# method (QAT = post-shot, QAT + KD = post-shot-distill, VCON, VCON + KD), and the two
# distillation methods at int4 g32 and int3 g32 (their post-shot and VCON runs are in
# lm_map). Both shards share the workdir (one dense LM, pretrained once).
# Run from a worktree at a fixed commit; experiments/lm_recovered.py reads the runs.
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
export PYTHONPATH=$PWD
W=${2:-/tmp/exp/w}
SHARD=$1
run() {  # cell, methods...
  local cell=$1; shift
  $PY -m vcon_experiments.cli compare --preset single \
    --config experiments/results/lm_baselines/$cell.json --methods "$@" --seeds 3 \
    --workdir $W --out /tmp/exp/out/lm_$cell --shard $SHARD/2 --no-progress
}
run quantize4g128 post-shot vcon post-shot-distill vcon-distill
run quantize4g32 post-shot-distill vcon-distill
run quantize3g32 post-shot-distill vcon-distill
