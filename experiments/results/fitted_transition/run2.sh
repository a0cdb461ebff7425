#!/bin/bash
# usage: run2.sh SHARD (0 or 1) [WORKDIR]: the rest of the LM map on this machine's dense
# LM (post-shot and the fixed Q = 20 % paired with the fitted default in every cell, both
# budgets), and the fitted VCON + distillation for the recovered-share table. After run.sh.
STUDY=fitted_transition SHARD=$1 W=${2:-/work/expw/w}
source "$(dirname "$0")/../study.sh"
# 0.04 epochs
for cell in lm_lowrank16 lm_lowrank8 lm_prune50; do
  run $cell 3 --methods post-shot
  run $cell 3 --methods vcon --transition-rule fixed
  run $cell 1 --methods vcon
done
run lm_prune2of4 3 --methods post-shot
run lm_prune2of4 3 --methods vcon --transition-rule fixed
run lm_quantize3g32 1 --methods vcon
run lm_quantize4g128 1 --methods vcon vcon-distill
run lm_quantize2g32 3 --methods vcon-distill
# 0.16 epochs
for cell in lm_quantize4g32 lm_prune2of4 lm_lowrank8; do
  run $cell 3 --methods post-shot --epochs 0.16
  run $cell 3 --methods vcon --transition-rule fixed --epochs 0.16
done
run lm_lowrank8 1 --methods vcon --epochs 0.16
run lm_prune2of4 1 --methods vcon --epochs 0.16
