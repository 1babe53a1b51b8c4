"""The experiment folder: logs/<experiment_name>_<timestamp>/ with config.json and training.log."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from moleflow.config.ablation import AblationConfig
from moleflow.evaluation.metrics import mean_metrics
from moleflow.evaluation.thresholds import THRESHOLD_METRICS


class ExperimentError(RuntimeError):
    """The experiment folder cannot be created or written; the message names the path and fix."""


MIN_FREE_BYTES = 200 * 1024 * 1024


def check_writable(directory: Path) -> None:
    """Fail fast when ``directory`` can't be created/written or its disk is (nearly) full."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_", delete=True) as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise ExperimentError(f"cannot write to log dir {directory}: {err.strerror or err}; "
                              f"pass --log_dir pointing at a writable folder") from err
    free = shutil.disk_usage(directory).free
    if free < MIN_FREE_BYTES:
        raise ExperimentError(f"only {free / 2**20:.0f} MiB free on the disk of {directory}; "
                              f"free space or pass --log_dir on another disk (need >= {MIN_FREE_BYTES // 2**20} MiB)")


def create_experiment_dir(log_dir: str, experiment_name: str) -> Path:
    """Create logs/<name>_<timestamp>/ and never reuse an existing folder."""
    root = Path(log_dir)
    check_writable(root)
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    path, suffix = root / f"{experiment_name}_{stamp}", 1
    while True:
        try:
            path.mkdir(parents=False, exist_ok=False)
            return path
        except FileExistsError:
            path, suffix = root / f"{experiment_name}_{stamp}_{suffix}", suffix + 1


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def setup_logger(exp_dir: Path, quiet: bool = False) -> logging.Logger:
    """Logger writing timestamped lines to <exp_dir>/training.log (append), info lines to stdout
    (not when ``quiet``) and warnings and errors to stderr (always)."""
    logger = logging.getLogger(f"moleflow.{exp_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    close_logger(logger)
    fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    file_handler = logging.FileHandler(exp_dir / "training.log", mode="a", encoding="utf-8")
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    if not quiet:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(message)s"))
        stream.addFilter(lambda record: not getattr(record, "file_only", False) and record.levelno < logging.WARNING)
        logger.addHandler(stream)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(warnings)
    return logger


FILE_ONLY = {"file_only": True}  # pass as ``extra=`` for lines that belong in training.log only


def _git_commit() -> str:
    try:
        repo = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers."""
    import numpy
    import sklearn
    import timm
    import torch
    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "timm": str(timm.__version__),
                "numpy": str(numpy.__version__), "scikit-learn": str(sklearn.__version__)}
    try:
        from importlib.metadata import version
        versions["FrEIA"] = version("FrEIA")
    except Exception:  # pragma: no cover - metadata missing
        versions["FrEIA"] = "unknown"
    return versions


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_config(exp_dir: Path, config: AblationConfig, extra: Optional[dict[str, Any]] = None) -> None:
    """config.json: every resolved setting, the command line, versions, git commit."""
    payload = {
        "config": config.to_dict(),
        "command_line": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": library_versions(),
        "git_commit": _git_commit(),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        **(extra or {}),
    }
    atomic_write_text(exp_dir / "config.json", json.dumps(payload, indent=2, sort_keys=False) + "\n")


RESULT_COLUMNS = ["task_id", "class_name", "routing_acc", "img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro"]


def write_results_csv(path: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write one row per class plus a last 'mean' row (unweighted mean of the rows above) and return
    the mean row. A value not measured (NaN, e.g. routing when the true task was given) is left empty.
    The decision columns (F1, precision, recall at the held-out threshold, empty without one; F1-max
    picked on the test set) follow when every row has them."""
    mean_row: dict[str, Any] = {"task_id": "mean", "class_name": "mean", **mean_metrics(rows)}
    columns = RESULT_COLUMNS + [c for c in THRESHOLD_METRICS if all(c in row for row in rows)]
    lines = [columns] + [[_fmt(row[c]) for c in columns] for row in [*rows, mean_row]]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(lines)
    os.replace(tmp, path)
    return mean_row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"  # not measured (e.g. routing of an oracle run)
    return str(value)


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """A fixed-width text table of result rows (metrics in percent, n/a where not measured)."""
    metrics = RESULT_COLUMNS[2:]
    header = f"{'task':>4} {'class':<16}" + "".join(f"{c:>12}" for c in metrics)
    out = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{'n/a':>12}" if math.isnan(float(row[c])) else f"{100 * float(row[c]):>12.2f}"
                        for c in metrics)
        out.append(f"{str(row['task_id']):>4} {str(row['class_name']):<16}" + cells)
    return "\n".join(out)
