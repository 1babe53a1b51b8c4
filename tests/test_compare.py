"""python -m moleflow.benchmark.compare: the side-by-side table of ours and the baselines."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import REPO, tiny_flags

from moleflow.benchmark.compare import build_table, is_baseline


def _result(value: float, baseline: bool = False) -> dict:
    row = {"img_auroc": value, "pixel_auroc": value, "pixel_ap": value, "aupro": value, "routing_acc": 1.0}
    rows = {"a": row, "b": row, "mean": row}
    return {"routed": rows, "oracle": None if baseline else rows, "baseline": baseline,
            "forgetting": {"img_auroc": 0.0, "pixel_auroc": 0.0}}


def test_table_gives_mean_and_std_over_seeds_and_one_row_per_baseline():
    results = {"ours": [_result(0.90), _result(0.92)], "patchcore_oracle": [_result(0.80, baseline=True)]}
    table, rows = build_table(["a", "b"], results)
    mean_rows = [r for r in rows[1:] if r[0] == "mean"]
    assert [r[1] for r in mean_rows] == ["ours (routed)", "ours (oracle)", "patchcore_oracle"]
    assert mean_rows[0][2] == "91.00 ± 1.41" and mean_rows[2][2] == "80.00"
    assert mean_rows[0][6] == "0.00 ± 0.00 / 0.00 ± 0.00" and mean_rows[0][7] == "100.00 ± 0.00"
    assert is_baseline(["--ablation_preset", "patchcore_oracle"]) and is_baseline(["--anomaly_score", "memory"])
    assert not is_baseline(["--ablation_preset", "paper_main"])


def test_compare_end_to_end_on_tiny_data(tiny_data, tmp_path):
    common = [f for f in tiny_flags(tiny_data, tmp_path / "unused", epochs=1)
              if f not in ("--dataset", "folder", "--data_path", str(tiny_data), "--task_classes", "fabric", "tile",
                           "--log_dir", str(tmp_path / "unused"))]
    out = tmp_path / "cmp"
    result = subprocess.run([sys.executable, "-m", "moleflow.benchmark.compare", "--data", str(tiny_data),
                             "--classes", "fabric", "tile", "--seeds", "0", "--variant", "ours", "", "--out", str(out),
                             "--", *common], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "compare.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    labels = {(r[0], r[1]) for r in rows[1:]}
    assert {("mean", "ours (routed)"), ("mean", "patchcore_oracle"), ("mean", "knn_our_features")} <= labels
    assert ("fabric", "ours (oracle)") in labels and (out / "compare.md").read_text().startswith("| class")
