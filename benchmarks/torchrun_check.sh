#!/usr/bin/env bash
# The plain run against torchrun with NPROC processes, same data and flags (issues 19 and 20): both
# wall times, both summaries, the largest difference per metric and the images routed differently
# (python -m moleflow.benchmark.same_results). Exit 1 when they differ by more than TOL.
# From the repository root:
#   NPROC=2 bash benchmarks/torchrun_check.sh                  # the benchmark's synthetic data
#   NPROC=4 bash benchmarks/torchrun_check.sh /data/mvtec --dataset mvtec --task_classes bottle cable
# With NPROC=1 the two runs must be byte-identical (same_results lists the identical files).
# Env: NPROC (2), OUT (/tmp/torchrun_check: data, logs, check.log), TOL (1e-3), PYTHON (python3),
#   SYNTH (synthetic data: classes n_train n_test min_px max_px, default "3 60 30 256 320"),
#   FLAGS (run flags, default: efficientnet_lite0 at 224 px, D 256, 4 epochs, batch 16).
#   On the device add PYTHONPATH for the wheels (see benchmarks/h200_session.sh).
set -uo pipefail
NPROC=${NPROC:-2}
OUT=${OUT:-/tmp/torchrun_check}
TOL=${TOL:-1e-3}
PYTHON=${PYTHON:-python3}
FLAGS=${FLAGS:-"--backbone_name efficientnet_lite0 --img_size 224 --feature_dim 256 --num_epochs 4 --batch_size 16"}
mkdir -p "$OUT"
if [ $# -ge 1 ]; then
  DATA=$1; shift
  DATA_FLAGS=(--data_path "$DATA" "$@")
else
  DATA=$OUT/data
  read -r N_CLASSES N_TRAIN N_TEST MIN_PX MAX_PX <<< "${SYNTH:-3 60 30 256 320}"
  "$PYTHON" -c "
from pathlib import Path
from moleflow.benchmark.synthetic import SyntheticSpec, generate_synthetic_dataset
generate_synthetic_dataset(Path('$DATA'), SyntheticSpec($N_CLASSES, $N_TRAIN, $N_TEST, $MIN_PX, $MAX_PX))" || exit 1
  DATA_FLAGS=(--dataset folder --data_path "$DATA")
fi
run() {  # run NAME COMMAND...: the run's output in $OUT/NAME.log, its folder under $OUT/NAME
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  local started=$SECONDS
  "$@" "${DATA_FLAGS[@]}" $FLAGS --log_dir "$OUT/$name" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - started)) s; $(grep -h '^mean image AUROC' "$OUT/$name.log")"
  return $status
}
{
  echo "== torchrun check: NPROC=$NPROC data=$DATA flags: $FLAGS $*"
  run plain "$PYTHON" run_moleflow.py || exit 1
  run "torchrun$NPROC" "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29533}" \
    run_moleflow.py || exit 1
  "$PYTHON" -m moleflow.benchmark.same_results "$OUT"/plain/*/ "$OUT/torchrun$NPROC"/*/ --tol "$TOL"
} 2>&1 | tee "$OUT/check.log"
exit "${PIPESTATUS[0]}"
