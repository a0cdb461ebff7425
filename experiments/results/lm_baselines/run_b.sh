#!/bin/bash
# usage: run_b.sh SHARD (0 or 1) [WORKDIR]: after run.sh, the methods that make every cell
# of the LM comparison paired on ONE dense model. The dense LM pretrained here (test bpb
# 1.7754) is not the one of lm_map (1.7678: pretraining is not bit-reproducible across
# machines), so lm_map's QAT / VCON runs cannot be paired with this study's distillation
# and GPTQ runs; QAT and VCON at int4 / int3 g32, and all four methods at int2 g32, are
# run here on this dense model. 0.04 epochs, 3 seeds. (Later found: it is the same dense
# model; lm_map's dense row was scored on all 11,790 test texts, and its 0.04-epoch runs
# reproduce from this one bit for bit: ../fitted_transition/README.md.) VCON runs keep
# the fixed Q = 20 % they were run with (the suite's default is now the fitted one).
STUDY=lm_baselines SHARD=$1 W=${2:-/tmp/exp/w}
source "$(dirname "$0")/../study.sh"
run quantize4g32 3 --methods post-shot vcon --transition-rule fixed
run quantize3g32 3 --methods post-shot vcon --transition-rule fixed
run quantize2g32 3 --methods post-shot vcon post-shot-distill vcon-distill \
  --transition-rule fixed
