#!/bin/bash
# usage: run.sh SHARD (0 or 1): the transition-length check on two WordNet transfer cells (1 epoch)
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
for cell in prune90 binarize; do
  for v in "--transition 0.2 --methods post-shot vcon" "--transition 0.1 --methods vcon"; do
    $PY -m vcon_experiments.cli compare --preset single --config experiments/results/classifier_defaults_study/$cell.json $v --seeds 3 --workdir /tmp/cstudy/w --out /tmp/cstudy/out/$cell --shard $1/2 --no-progress
  done
done
