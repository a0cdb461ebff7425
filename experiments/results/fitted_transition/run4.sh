#!/bin/bash
# usage: run4.sh SHARD (0 or 1) [WORKDIR]: the recovered-share table at 0.16 epochs (issue
# 32 item 3's second budget), 3 seeds: QAT and QAT + KD at every format; the fitted VCON
# and VCON + KD where their Q is not 0 (int2 g32; at int4 / int3 the fitted run is the QAT
# run, checked on seed 0). After run3.sh.
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
export PYTHONPATH=$PWD
W=${2:-/work/expw/w}
SHARD=$1
D=experiments/results/fitted_transition
run() {  # config, seeds, methods...
  local cell=$1 seeds=$2; shift 2
  $PY -m vcon_experiments.cli compare --preset single --config $D/$cell.json --seeds $seeds \
    --epochs 0.16 --methods "$@" --workdir $W --out /tmp/exp/out/fit4_$cell \
    --shard $SHARD/2 --no-progress
}
run lm_quantize4g128 3 post-shot post-shot-distill
run lm_quantize2g32 3 post-shot-distill vcon-distill
run lm_quantize4g128 1 vcon vcon-distill
run lm_quantize3g32 3 post-shot post-shot-distill
run lm_quantize4g32 3 post-shot-distill
