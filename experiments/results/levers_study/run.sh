#!/bin/bash
# usage: run.sh SHARD (0 or 1) [WORKDIR]: the levers study of issue 18 item 8 -- a beta
# warm-up hold, a learning-rate restart at the end of the transition and the distillation
# weight, on the LM's 0.04-epoch cells (2:4, int2 g32; 2 seeds) and the WordNet
# Transformer's 1-epoch transfer cells (prune 90 %, binary; 3 seeds); then the LM's
# units-50 % cell at 0.16 epochs (the units_map preset). Run both shards at once.
# Since it ran, the suite refuses the distillation variants on the transfer cells (their
# teacher's target head is untrained): those compare calls now stop with that message.
cd "$(dirname "$0")/../../.."  # the repository (a worktree at a fixed commit)
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
W=${2:-/tmp/exp/w}
VARIANTS=("--methods post-shot vcon" "--beta-hold 0.05 --methods vcon"
          "--lr-schedule restart --methods vcon" "--methods vcon-distill"
          "--distill-weight 0.25 --methods vcon-distill" "--distill-weight 1 --methods vcon-distill")
run() {  # CONFIG SEEDS OUT
  for v in "${VARIANTS[@]}"; do
    $PY -m vcon_experiments.cli compare --preset single --config $1 $v --seeds $2 \
      --workdir $W --out /tmp/exp/out/$3 --shard $SHARD/2 --no-progress
  done
}
SHARD=$1
for cell in prune2of4 quantize2g32; do run experiments/results/lm_defaults_study/$cell.json 2 lm_$cell; done
for cell in prune90 binarize; do run experiments/results/classifier_defaults_study/$cell.json 3 cls_$cell; done
$PY -m vcon_experiments.cli compare --preset units_map --workdir $W --out /tmp/exp/out/units \
  --shard $SHARD/2 --no-progress
