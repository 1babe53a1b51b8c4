"""Decision thresholds set without test labels, and the decisions they give (pure numpy functions).

A task's threshold is a quantile of its held-out good training images' image scores
(``--val_fraction``, ``--threshold_quantile``); an image is anomalous when its score is *above* the
threshold of the task it was routed to. With only a few held-out images the quantile is close to
their largest score, and the false-alarm rate on new good images is roughly ``1 / (n + 1)``.

``f1_max`` is the best F1 over every threshold *picked on the test set*: it uses the test labels
and is reported only for comparison with papers that publish it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

THRESHOLD_RULE = "quantile of the held-out good training images' image scores (linear interpolation)"
THRESHOLD_METRICS: tuple[str, ...] = ("f1_at_threshold", "precision_at_threshold", "recall_at_threshold",
                                      "f1_max_test_picked")


def quantile_threshold(scores: ArrayLike, quantile: float) -> Optional[float]:
    """The ``quantile`` of held-out image scores (as ``numpy.quantile``); None without scores."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    return float(np.quantile(values, quantile)) if values.size else None


def decisions(scores: ArrayLike, thresholds: ArrayLike) -> np.ndarray:
    """Per image: 1.0 anomalous (score > threshold), 0.0 normal, NaN where the threshold is NaN."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    out = (s > t).astype(np.float64)
    out[np.isnan(t)] = np.nan
    return out


def f1_precision_recall(labels: ArrayLike, predicted: ArrayLike) -> dict[str, float]:
    """F1, precision and recall of binary decisions (1 = anomalous) against labels (1 = defect).

    Precision with no image called anomalous is 0 (as scikit-learn's ``zero_division=0``); NaN
    everywhere when any decision is missing (NaN: no threshold).
    """
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(predicted, dtype=np.float64).ravel()
    if p.size == 0 or np.isnan(p).any():
        nan = float("nan")
        return {"f1_at_threshold": nan, "precision_at_threshold": nan, "recall_at_threshold": nan}
    called = p > 0.5
    true_pos = float(np.sum(called & y))
    precision = true_pos / called.sum() if called.any() else 0.0
    recall = true_pos / y.sum() if y.any() else float("nan")
    f1 = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return {"f1_at_threshold": float(f1), "precision_at_threshold": float(precision),
            "recall_at_threshold": float(recall)}


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """The largest F1 over all thresholds (anomalous: score >= threshold), picked with the test labels;
    NaN without defective images."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # last index of each tied score
    true_pos = np.cumsum(y_sorted)[ends]
    called = ends + 1
    f1 = 2.0 * true_pos / (called + y.sum())
    return float(f1.max())


def threshold_metrics(labels: ArrayLike, scores: ArrayLike, thresholds: ArrayLike) -> dict[str, float]:
    """F1, precision, recall at the given per-image thresholds (NaN: none) and the test-picked F1-max."""
    return {**f1_precision_recall(labels, decisions(scores, thresholds)), "f1_max_test_picked": f1_max(labels, scores)}


def per_image_thresholds(task_ids: Sequence[int], by_task: Sequence[Optional[float]]) -> np.ndarray:
    """Each image's threshold: that of the task it was routed to (NaN where the task has none)."""
    table = np.array([math.nan if t is None else t for t in by_task], dtype=np.float64)
    return table[np.asarray(task_ids, dtype=np.int64)] if len(task_ids) else np.zeros(0)
