#!/usr/bin/env bash
# Batch runs of MoLE-Flow, one run per GPU at a time, then the summary table of all of them.
#
#   bash run.sh [main|seeds|ablations|all]        (default main)
#   GPUS="0 1 2 3" SEEDS="0 1 2" bash run.sh all  (every preset x every seed: the paper's tables)
#
# main: the main configuration, first seed | seeds: the main configuration, every seed
# ablations: every --ablation_preset (read from the config at run time), first seed | all: presets x seeds
# Each run: $PY --ablation_preset P --seed S --experiment_name P_sS --log_dir $LOG_DIR --data_path $DATA $EXTRA
# (+ --feature_cache $FEATURE_CACHE when set: the runs read each other's backbone features, see README)
# with CUDA_VISIBLE_DEVICES=<its GPU>. Folders, commands.txt, console/<run>.log and summary_* go to LOG_DIR.
# A failed run does not stop the others; failures are listed at the end and the exit status is 1.
# DRY_RUN=1 prints the command lines only. The queue is moleflow/sweep.py.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GPUS=${GPUS:-0}                        # GPU ids, one run per id at a time ("0 1 2 3"); cpu = one by one, no GPU
DATA=${DATA:-./data/MVTecAD}           # data root (MVTec layout: root/<class>/train/good ...)
LOG_DIR=${LOG_DIR:-logs/sweep_$(date +%Y%m%d_%H%M%S)}   # shared --log_dir of the sweep's runs
SEEDS=${SEEDS:-"0 1 2"}
PRESETS=${PRESETS:-}                   # presets for ablations/all; empty = every preset in moleflow/config/ablation.py
EXTRA=${EXTRA:-}                       # extra flags for every run, e.g. "--num_epochs 10 --amp --tf32"
PYTHON=${PYTHON:-python}               # interpreter of the queue and the summary
PY=${PY:-"$PYTHON $HERE/run_moleflow.py"}  # command that starts one run (tests put a fake run here)
DRY_RUN=${DRY_RUN:-}

FEATURE_CACHE=${FEATURE_CACHE:-}       # feature cache folder shared by every run (empty: the default location,
                                       # shared too: $MOLEFLOW_CACHE_DIR or ~/.cache/moleflow/features)
SHARED="--data_path $(printf %q "$DATA")${FEATURE_CACHE:+ --feature_cache $(printf %q "$FEATURE_CACHE")}"

mode=${1:-main}
case "$mode" in
  main|seeds|ablations|all) ;;
  *) echo "usage: bash run.sh [main|seeds|ablations|all]" >&2; exit 2 ;;
esac

export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
exec $PYTHON -m moleflow.sweep "$mode" --gpus "$GPUS" --seeds "$SEEDS" --presets "$PRESETS" \
  --log_dir "$LOG_DIR" --run "$PY" --extra="$SHARED $EXTRA" ${DRY_RUN:+--dry_run}
