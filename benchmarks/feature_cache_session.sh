#!/usr/bin/env bash
# Issue 19 figures in one device call (one H200 host, < 10 minutes), from the repository root; carry .whl
# (FrEIA 0.2, timm 1.0.31, xxhash). Writes $OUT/decode.log (decoding alone: the old thread pool vs the worker
# processes, on the synthetic data), $OUT/warm.json / warm.log (the benchmark cold, then with the cache warm),
# and, while time is left, $OUT/breakdown.log (the warm read path's parts). EPOCHS (default 2) keeps the runs short: the decode + extraction figures
# do not depend on it.
set -uo pipefail
export PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $(( 570 - $(date +%s) + START )); }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
DATA=${DATA:-/tmp/bench/data}
{ nproc; nvidia-smi --query-gpu=name --format=csv,noheader; } > "$OUT/machine.log"
timeout 200 python3 -m moleflow.benchmark --weights random --data_path "$DATA" --skip_run --skip_limits \
  --json /tmp/gen.json > "$OUT/gen.log" 2>&1
timeout 120 python3 - "$DATA" > "$OUT/decode.log" 2>&1 <<'PY'
import sys, time
from pathlib import Path
from moleflow.data import list_classes, load_class_split
from moleflow.data.dataset import AnomalyDataset
from moleflow.extractors.features import decode_all
from moleflow.extractors.decoding import decode_workers, decoded_chunks, start_workers
if __name__ == "__main__":
    root = Path(sys.argv[1])
    samples = [s for c in list_classes("folder", root)[:5] for split in [load_class_split("folder", root, c)]
               for s in split.train + split.test]
    t = time.perf_counter(); decode_all(AnomalyDataset(samples, 224)); dt = time.perf_counter() - t
    print(f"thread pool (before): {len(samples)} images, {len(samples) / dt:.0f} img/s")
    workers = decode_workers(0)
    start_workers(workers); time.sleep(3)
    for _ in range(2):
        t = time.perf_counter(); n = sum(len(i) for i, _ in decoded_chunks(samples, 224, "crop", workers))
        print(f"{workers} worker processes (after): {n} images, {n / (time.perf_counter() - t):.0f} img/s")
PY
timeout 420 python3 -m moleflow.benchmark --weights random --data_path "$DATA" --skip_limits --amp --tf32 \
  --set num_epochs=${EPOCHS:-2} --warm_cache --feature_cache /tmp/feature_cache --json "$OUT/warm.json" \
  > "$OUT/warm.log" 2>&1
echo "exit $?" >> "$OUT/warm.log"
python3 -m moleflow.cache --info /tmp/feature_cache >> "$OUT/warm.log" 2>&1
rm -rf /tmp/feature_cache
[ "$(left)" -gt 60 ] && timeout "$(left)" python3 benchmarks/cache_read_breakdown.py "$DATA" /tmp/fcdiag \
  > "$OUT/breakdown.log" 2>&1
rm -rf /tmp/fcdiag
exit 0
