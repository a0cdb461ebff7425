# Sourced by a study's run scripts (experiments/results/<study>/run*.sh): from the
# repository root (two folders above the script), with the project's venv (or the main
# checkout's), `run CONFIG SEEDS OPTIONS...` runs one `vcon-jax compare --preset single`
# of the study's CONFIG.json as shard $SHARD of 2 in $W. Set STUDY, SHARD and W first.
cd "$(dirname "${BASH_SOURCE[1]}")/../../.."
PY=.venv/bin/python
[ -x $PY ] || PY=/work/main/.venv/bin/python
export PYTHONPATH=$PWD
run() {  # config, seeds, options...
  local cell=$1 seeds=$2; shift 2
  $PY -m vcon_experiments.cli compare --preset single \
    --config experiments/results/$STUDY/$cell.json --seeds $seeds --workdir $W \
    --out /tmp/exp/out/${STUDY}_$cell --shard $SHARD/2 --no-progress "$@"
}
