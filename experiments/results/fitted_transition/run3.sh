#!/bin/bash
# usage: run3.sh SHARD (0 or 1) [WORKDIR]: the fitted VCON and VCON + KD at every format of
# the recovered-share table (lm_baselines), 3 seeds, 0.04 epochs. After run2.sh.
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
export PYTHONPATH=$PWD
W=${2:-/work/expw/w}
SHARD=$1
D=experiments/results/fitted_transition
for cell in lm_quantize4g128 lm_quantize4g32 lm_quantize3g32 lm_quantize2g32; do
  $PY -m vcon_experiments.cli compare --preset single --config $D/$cell.json --seeds 3 \
    --methods vcon vcon-distill --workdir $W --out /tmp/exp/out/fit3_$cell \
    --shard $SHARD/2 --no-progress
done
