"""The embedded demo really detects: run `run_moleflow.py --demo` as a user would (about a minute on 2 cores)."""

from __future__ import annotations

import csv

from conftest import only_experiment, run_cli


def test_demo_detects_and_routes(tmp_path):
    proc = run_cli(["--demo", "--log_dir", str(tmp_path / "logs")], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "data" / "moleflow_demo" / ".moleflow_demo_v1").is_file()
    with open(only_experiment(tmp_path / "logs") / "final_results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class_name"] for r in rows] == ["fabric", "tile", "nut", "mean"]
    mean = rows[-1]
    assert float(mean["img_auroc"]) >= 0.90
    assert float(mean["routing_acc"]) == 1.0
    assert "mean image AUROC" in proc.stdout
