#!/usr/bin/env bash
# Batch runs of MoLE-Flow as plain command lines. Edit the variables, then: bash run.sh [main|ablations|seeds|all]
set -euo pipefail

GPU=${GPU:-0}                          # CUDA device id
DATA=${DATA:-./data/MVTecAD}           # MVTec AD root (root/<class>/train/good ...)
LOG_DIR=${LOG_DIR:-logs}
SEEDS=${SEEDS:-"0 1 2"}
EXTRA=${EXTRA:-}                       # extra flags for every run, e.g. "--num_epochs 10"

export CUDA_VISIBLE_DEVICES=$GPU
PY="python run_moleflow.py --data_path $DATA --log_dir $LOG_DIR $EXTRA"

main() {
  $PY --experiment_name main
}

ablations() {
  for preset in wo_lora wo_router wo_adapter wo_pos_embed wo_dia wo_spatial_context wo_scale_context \
                wo_tail_loss wo_router_adapter lora_only baseline_nf; do
    $PY --ablation_preset "$preset" --experiment_name "ablation_$preset"
  done
}

seeds() {
  dirs=()
  for seed in $SEEDS; do
    $PY --seed "$seed" --experiment_name "main_seed$seed"
    dirs+=("$(ls -d "$LOG_DIR"/main_seed"$seed"_* | tail -n 1)")
  done
  python -m moleflow.summarize "${dirs[@]}" --out "$LOG_DIR/summary_main_seeds.csv"
}

case "${1:-main}" in
  main) main ;;
  ablations) ablations ;;
  seeds) seeds ;;
  all) main; ablations; seeds ;;
  *) echo "usage: bash run.sh [main|ablations|seeds|all]" >&2; exit 2 ;;
esac
