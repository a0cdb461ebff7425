#!/bin/bash
# usage: run2.sh SHARD (0 or 1) [WORKDIR]: the follow-up of run.sh -- post-shot with the
# same distillation term (weights 0.5 and 1), the fair baseline of vcon-distill, on the
# LM's two cells and seeds, in the same workdir (the same dense LM). Not on the classifier
# cells: they are transfer cells, whose frozen teacher has an untrained head.
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
W=${2:-/tmp/exp/w}
SHARD=$1
for v in "--methods post-shot-distill" "--distill-weight 1 --methods post-shot-distill"; do
  for cell in prune2of4 quantize2g32; do
    $PY -m vcon_experiments.cli compare --preset single --config experiments/results/lm_defaults_study/$cell.json $v \
      --seeds 2 --workdir $W --out /tmp/exp/out/lm_$cell --shard $SHARD/2 --no-progress
  done
done
