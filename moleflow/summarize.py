"""Mean ± std over runs (e.g. seeds) of the per-class final results.

Usage::

    python -m moleflow.summarize logs/run_a logs/run_b ... [--out summary.csv]

Each folder must hold the ``final_results.csv`` written by ``run_moleflow.py`` (one row per class,
last row ``mean``). The standard deviation is the sample standard deviation (ddof = 1) over runs;
it is NaN for a single run. A NaN in any run makes that cell's mean NaN (nothing is skipped).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np
import pandas as pd

RESULT_FILE = "final_results.csv"
METRIC_COLUMNS: tuple[str, ...] = ("routing_acc", "img_auroc", "pixel_auroc", "img_ap",
                                   "pixel_ap", "aupro")
KEY_COLUMNS: tuple[str, ...] = ("task_id", "class_name")


class SummaryError(Exception):
    """A run folder that cannot be summarised; the message is one actionable line."""


def load_run(folder: str | os.PathLike) -> pd.DataFrame:
    """Read one run's ``final_results.csv``.

    Args:
        folder: Experiment folder.

    Returns:
        The table indexed by ``class_name`` with ``task_id`` and the metric columns.

    Raises:
        SummaryError: If the file is missing, lacks columns, or has duplicate classes.
    """
    path = os.path.join(folder, RESULT_FILE)
    if not os.path.isfile(path):
        raise SummaryError(f"{folder} has no {RESULT_FILE} (expected {path}); pass experiment "
                           "folders written by run_moleflow.py that finished")
    table = pd.read_csv(path, dtype={"class_name": str})
    missing = [c for c in (*KEY_COLUMNS, *METRIC_COLUMNS) if c not in table.columns]
    if missing:
        raise SummaryError(f"{path} lacks column(s) {', '.join(missing)}")
    if table["class_name"].duplicated().any():
        raise SummaryError(f"{path} lists a class twice: "
                           f"{sorted(set(table['class_name'][table['class_name'].duplicated()]))}")
    return table.set_index("class_name")


def summarize_runs(tables: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """Mean and sample std over runs for each class row (including the ``mean`` row).

    Args:
        tables: One ``load_run`` table per run.
        names: Run names for error messages.

    Returns:
        Columns ``task_id, class_name, n_runs, <metric>_mean, <metric>_std`` in the first run's
        row order.

    Raises:
        SummaryError: If the runs do not list the same classes.
    """
    classes = list(tables[0].index)
    for table, name in zip(tables[1:], names[1:]):
        if set(table.index) != set(classes):
            raise SummaryError(f"{name} has classes {sorted(table.index)} but {names[0]} has "
                               f"{sorted(classes)}; summarise runs of the same task sequence")
    rows = []
    for cls in classes:
        row: dict[str, object] = {"task_id": tables[0].loc[cls, "task_id"], "class_name": cls,
                                  "n_runs": len(tables)}
        for metric in METRIC_COLUMNS:
            values = np.array([float(t.loc[cls, metric]) for t in tables])
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """Human-readable table, one line per class, cells ``mean ± std``."""
    header = ["class_name".ljust(14)] + [m.rjust(19) for m in METRIC_COLUMNS]
    lines = [f"mean ± sample std (ddof=1) over {int(summary['n_runs'].iloc[0])} run(s)",
             " ".join(header)]
    for _, row in summary.iterrows():
        cells = [("n/a" if np.isnan(row[f"{m}_mean"]) else f"{row[f'{m}_mean']:.4f} ± {row[f'{m}_std']:.4f}").rjust(19)
                 for m in METRIC_COLUMNS]  # n/a: not measured (routing of oracle runs)
        lines.append(" ".join([str(row["class_name"]).ljust(14), *cells]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 on a user error)."""
    parser = argparse.ArgumentParser(prog="python -m moleflow.summarize",
                                     description="Mean ± std of final_results.csv over runs.")
    parser.add_argument("folders", nargs="+", help="experiment folders (one per run/seed)")
    parser.add_argument("--out", default="summary.csv", help="output CSV (default ./summary.csv)")
    args = parser.parse_args(argv)
    try:
        tables = [load_run(folder) for folder in args.folders]
        summary = summarize_runs(tables, args.folders)
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    summary.to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
