#!/bin/bash
# usage: run_b.sh SHARD (0 or 1) [WORKDIR]: after run.sh, the methods that make every cell
# of the LM comparison paired on ONE dense model. The dense LM pretrained here (test bpb
# 1.7754) is not the one of lm_map (1.7678: pretraining is not bit-reproducible across
# machines), so lm_map's QAT / VCON runs cannot be paired with this study's distillation
# and GPTQ runs; QAT and VCON at int4 / int3 g32, and all four methods at int2 g32, are
# run here on this dense model. 0.04 epochs, 3 seeds.
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
run quantize4g32 post-shot vcon
run quantize3g32 post-shot vcon
run quantize2g32 post-shot vcon post-shot-distill vcon-distill
