#!/bin/bash
# usage: run.sh SHARD (0 or 1) [WORKDIR]: the field's LM baselines missing from lm_map and
# levers_study (issue 32 item 3), 0.04 epochs, 3 seeds: int4 g128 with every trained
# method (QAT = post-shot, QAT + KD = post-shot-distill, VCON, VCON + KD), and the two
# distillation methods at int4 g32 and int3 g32 (their post-shot and VCON runs are in
# lm_map). Both shards share the workdir (one dense LM, pretrained once).
# Run from a worktree at a fixed commit; experiments/lm_recovered.py reads the runs. VCON
# runs keep the fixed Q = 20 % they were run with (the suite now fits it by default).
STUDY=lm_baselines SHARD=$1 W=${2:-/tmp/exp/w}
source "$(dirname "$0")/../study.sh"
run quantize4g128 3 --methods post-shot vcon post-shot-distill vcon-distill \
  --transition-rule fixed
run quantize4g32 3 --methods post-shot-distill vcon-distill --transition-rule fixed
run quantize3g32 3 --methods post-shot-distill vcon-distill --transition-rule fixed
