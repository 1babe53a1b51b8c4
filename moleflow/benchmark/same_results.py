"""Do two finished runs agree? Used to hold a torchrun run against the plain run of the same flags.

    python -m moleflow.benchmark.same_results RUN_A RUN_B [--tol 1e-3]

Prints, per metric of ``final_results.csv``, the largest difference over the class rows and the
mean row, and how many test images (``per_image_scores.csv``) the two runs routed to different
experts; says whether the result files are byte-identical. Exit status 0 when every difference is
within ``--tol`` and the routing is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

METRICS = ("routing_acc", "img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro")
FILES = ("final_results.csv", "final_results_oracle.csv", "per_image_scores.csv", "thresholds.csv")


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; pass the folders of two finished runs")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def metric_differences(a: Path, b: Path) -> dict[str, float]:
    """Largest |a - b| per metric over the rows of the two runs' final_results.csv (NaN = NaN)."""
    rows_a = {r["class_name"]: r for r in _read(a / "final_results.csv")}
    rows_b = {r["class_name"]: r for r in _read(b / "final_results.csv")}
    if rows_a.keys() != rows_b.keys():
        raise SystemExit(f"error: {a} and {b} evaluated different classes; compare runs of the same flags")

    def diff(x: float, y: float) -> float:
        return 0.0 if math.isnan(x) and math.isnan(y) else abs(x - y)

    return {m: max(diff(float(row[m]), float(rows_b[name][m])) for name, row in rows_a.items()) for m in METRICS}


def routing_changes(a: Path, b: Path) -> int:
    """Test images the two runs routed to different experts."""
    def routes(run: Path) -> dict[str, str]:
        return {r["path"]: r["routed_task"] for r in _read(run / "per_image_scores.csv")}

    ra, rb = routes(a), routes(b)
    return sum(ra.get(k) != rb.get(k) for k in ra.keys() | rb.keys())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moleflow.benchmark.same_results",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--tol", type=float, default=1e-3, help="largest allowed metric difference (default 1e-3)")
    args = parser.parse_args(argv)
    worst = metric_differences(args.run_a, args.run_b)
    changed = routing_changes(args.run_a, args.run_b)
    same = [name for name in FILES if (args.run_a / name).is_file() and (args.run_b / name).is_file()
            and (args.run_a / name).read_bytes() == (args.run_b / name).read_bytes()]
    for metric, value in worst.items():
        print(f"{metric:12s} largest difference {value:.6f}")
    print(f"test images routed differently: {changed}")
    print(f"byte-identical files: {', '.join(same) if same else 'none'}")
    ok = all(v <= args.tol for v in worst.values()) and changed == 0
    print(f"{'SAME' if ok else 'DIFFERENT'} within {args.tol:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
