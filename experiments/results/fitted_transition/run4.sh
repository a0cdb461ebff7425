#!/bin/bash
# usage: run4.sh SHARD (0 or 1) [WORKDIR]: the recovered-share table at 0.16 epochs (issue
# 32 item 3's second budget), 3 seeds: QAT and QAT + KD at every format; the fitted VCON
# and VCON + KD where their Q is not 0 (int2 g32; at int4 / int3 the fitted run is the QAT
# run, checked on seed 0). After run3.sh.
STUDY=fitted_transition SHARD=$1 W=${2:-/work/expw/w}
source "$(dirname "$0")/../study.sh"
run lm_quantize4g128 3 --epochs 0.16 --methods post-shot post-shot-distill
run lm_quantize2g32 3 --epochs 0.16 --methods post-shot-distill vcon-distill
run lm_quantize4g128 1 --epochs 0.16 --methods vcon vcon-distill
run lm_quantize3g32 3 --epochs 0.16 --methods post-shot post-shot-distill
run lm_quantize4g32 3 --epochs 0.16 --methods post-shot-distill
