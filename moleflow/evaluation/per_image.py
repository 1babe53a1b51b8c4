"""Per-image results of the final routed evaluation and the image AUROC of each defect type.

``per_image_scores.csv``: one row per test image (task_id, class_name, path relative to
``--data_path``, defect_type, label, image_score, routed_task, router_distance, threshold,
is_anomalous). ``results_by_defect_type.csv``: per class and defect type, the image AUROC of that
defect type's images against the class's good images, with both counts.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from moleflow.data.base import Sample
from moleflow.evaluation.metrics import auroc

PER_IMAGE_COLUMNS = ["task_id", "class_name", "path", "defect_type", "label", "image_score", "routed_task",
                     "router_distance", "threshold", "is_anomalous"]
DEFECT_COLUMNS = ["task_id", "class_name", "defect_type", "n_good", "n_defect", "img_auroc"]


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with '/' separators (absolute when it is not under ``root``)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(path).as_posix()


def per_image_rows(task_id: int, class_name: str, samples: Sequence[Sample], scores: Sequence[float],
                   routed: Sequence[int], distances: Optional[Sequence[float]], thresholds: Sequence[Optional[float]],
                   root: Path) -> list[dict[str, Any]]:
    """One row per test image of a class, in the order of ``samples``.

    Args:
        task_id: the task the class was learned in.
        routed: the task each image was scored with.
        distances: each one's router distance to the task it was routed to (None: not routed).
        thresholds: the threshold of every task (None: none).
        root: ``--data_path``.
    """
    rows = []
    for i, sample in enumerate(samples):
        task = int(routed[i])
        threshold = thresholds[task] if task < len(thresholds) else None
        score = float(scores[i])
        rows.append({"task_id": task_id, "class_name": class_name, "path": relative_path(sample.image_path, root),
                     "defect_type": sample.defect_type, "label": int(sample.label), "image_score": score,
                     "routed_task": task, "router_distance": float("nan") if distances is None else float(distances[i]),
                     "threshold": float("nan") if threshold is None else float(threshold),
                     "is_anomalous": "" if threshold is None else int(score > threshold)})
    return rows


def defect_type_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per class (in row order) and defect type (sorted): image AUROC of that type against the good
    images, from ``per_image_rows``."""
    out = []
    for task_id, name in dict.fromkeys((r["task_id"], r["class_name"]) for r in rows):
        mine = [r for r in rows if r["class_name"] == name]
        good = [r["image_score"] for r in mine if r["label"] == 0]
        for defect in sorted({r["defect_type"] for r in mine if r["label"] == 1}):
            bad = [r["image_score"] for r in mine if r["label"] == 1 and r["defect_type"] == defect]
            value = (auroc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad]) if good
                     else float("nan"))
            out.append({"task_id": task_id, "class_name": name, "defect_type": defect, "n_good": len(good),
                        "n_defect": len(bad), "img_auroc": value})
    return out


def write_rows(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """A CSV with ``columns``; floats with 6 decimals, NaN as an empty cell."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in columns])
    os.replace(tmp, path)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return str(value)
