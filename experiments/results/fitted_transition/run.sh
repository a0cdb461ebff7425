#!/bin/bash
# usage: run.sh SHARD (0 or 1) [WORKDIR]: the fitted transition (issue 32 items 1-2) where
# it changes a run, on the dense models of this machine. Both shards share the workdir.
# Copy the committed runs this reuses into WORKDIR first (see README.md). Run from a
# worktree at a fixed commit; experiments/fitted_table.py reads the runs.
STUDY=fitted_transition SHARD=$1 W=${2:-/work/expw/w}
source "$(dirname "$0")/../study.sh"
# 1. where the fitted Q is 20 % (every classifier cell): the same run as 0.3's vcon-Q20
run vit_prune90 1 --methods vcon
# 2. where it is 0 (int4, 2:4): the post-shot run, bit for bit
run lm_quantize4g32 1 --methods vcon
run lm_prune2of4 1 --methods post-shot vcon
# 3. where it is shorter than 20 %, 0.04 epochs, 3 seeds, paired with post-shot and the
#    fixed Q = 20 % from the same dense LM
run lm_binarize 3 --methods post-shot vcon
run lm_binarize 3 --methods vcon --transition-rule fixed
run lm_quantize2g32 3 --methods vcon
run lm_units50 3 --methods vcon
# 4. the same at 0.16 epochs
run lm_units50 3 --methods vcon --epochs 0.16
run lm_quantize2g32 3 --methods post-shot vcon --epochs 0.16
run lm_quantize2g32 3 --methods vcon --epochs 0.16 --transition-rule fixed
