#!/bin/bash
# usage: run3.sh SHARD (0 or 1) [WORKDIR]: the fitted VCON and VCON + KD at every format of
# the recovered-share table (lm_baselines), 3 seeds, 0.04 epochs. After run2.sh.
STUDY=fitted_transition SHARD=$1 W=${2:-/work/expw/w}
source "$(dirname "$0")/../study.sh"
for cell in lm_quantize4g128 lm_quantize4g32 lm_quantize3g32 lm_quantize2g32; do
  run $cell 3 --methods vcon vcon-distill
done
