"""Detection and localisation metrics as pure functions (numpy in, Python floats out).

All curves are exact: the scores are sorted once and every distinct score is a threshold
(a sample is called anomalous when its score is >= the threshold), as in scikit-learn.
``auroc`` and ``average_precision`` agree with ``sklearn.metrics.roc_auc_score`` and
``average_precision_score`` to floating-point rounding. An undefined metric (one class only,
no defect region) is NaN and a ``MetricUndefinedWarning`` says why.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from moleflow.evaluation.thresholds import THRESHOLD_METRICS

METRIC_NAMES: tuple[str, ...] = ("img_auroc", "img_ap", "pixel_auroc", "pixel_ap", "aupro",
                                 "routing_acc", *THRESHOLD_METRICS)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class MetricUndefinedWarning(UserWarning):
    """A metric was returned as NaN because it is undefined on the given data."""


def _undefined(reason: str) -> float:
    warnings.warn(reason, MetricUndefinedWarning, stacklevel=3)
    return float("nan")


def _as_binary(labels: ArrayLike, name: str) -> np.ndarray:
    """Flatten labels to a bool array; values must be 0/1 (or bool)."""
    arr = np.asarray(labels).ravel()
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0 (normal) and 1 (anomalous), "
                             f"got values {np.unique(arr)[:10].tolist()}")
        arr = arr.astype(bool)
    return arr


def _as_scores(scores: ArrayLike, name: str, size: int) -> np.ndarray:
    """Flatten scores to float64 and check they are finite and as many as the labels."""
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size != size:
        raise ValueError(f"{name} has {arr.size} values but the labels have {size}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(arr)).sum())} NaN/inf values "
                         "(a diverged flow?); metrics need finite scores")
    return arr


def _descending_sort(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``order`` ``(n,)`` sorting ``scores`` descending and ``ends`` ``(m,)``: where each run of equal
    sorted scores ends (one per distinct threshold)."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    return order, ends


def _counts(labels_sorted: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False / true positive counts ``(m,)`` at each distinct threshold."""
    tps = np.cumsum(labels_sorted, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    return fps, tps


def _auroc_from_counts(fps: np.ndarray, tps: np.ndarray) -> float:
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return float(np.trapezoid(tpr, fpr))


def _ap_from_counts(fps: np.ndarray, tps: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (no interpolation)."""
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _check_two_classes(y: np.ndarray, metric: str) -> str | None:
    n_pos = int(y.sum())
    if n_pos == 0:
        return f"{metric} undefined: no anomalous samples (all {y.size} labels are 0); returning NaN"
    if n_pos == y.size:
        return f"{metric} undefined: no normal samples (all {y.size} labels are 1); returning NaN"
    return None


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve.

    Args:
        labels: ``(N,)`` 0 = normal, 1 = anomalous (any shape, flattened).
        scores: ``(N,)`` anomaly scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1]; ties count one half. NaN (with a warning) if only one class is present.
    """
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, "scores", y.size)
    if reason := _check_two_classes(y, "AUROC"):
        return _undefined(reason)
    order, ends = _descending_sort(s)
    return _auroc_from_counts(*_counts(y[order], ends))


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n`` (scikit-learn's definition).

    Args:
        labels: ``(N,)`` 0 = normal, 1 = anomalous.
        scores: ``(N,)`` anomaly scores.

    Returns:
        AP in [0, 1]. NaN (with a warning) if only one class is present.
    """
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, "scores", y.size)
    if reason := _check_two_classes(y, "AP"):
        return _undefined(reason)
    order, ends = _descending_sort(s)
    return _ap_from_counts(*_counts(y[order], ends))


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel PRO weights: ``1 / (num_regions * region_size)`` on defect pixels, 0 elsewhere.

    Regions are the 8-connected components of each image's mask, so summing the weights of the
    defect pixels above a threshold gives the mean per-region overlap.

    Args:
        masks: ``(N, H, W)`` ground-truth masks (non-zero = defect).

    Returns:
        ``(N * H * W,)`` float64 weights and the number of regions.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask != 0, structure=_EIGHT_CONNECTED)
        region_ids[i] = np.where(labelled > 0, labelled + num_regions, 0)
        num_regions += count
    flat_ids = region_ids.ravel()
    if num_regions == 0:
        return np.zeros(flat_ids.size), 0
    sizes = np.bincount(flat_ids, minlength=num_regions + 1).astype(np.float64)
    per_region = np.zeros(num_regions + 1)
    per_region[1:] = 1.0 / (num_regions * sizes[1:])
    return per_region[flat_ids], num_regions


def _integrate_pro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under PRO(FPR) on [0, fpr_limit] / fpr_limit; ``fpr`` non-decreasing from 0 to 1."""
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))   # points with fpr <= limit
    xs, ys = fpr[:inside], pro[:inside]
    if xs[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        xs, ys = np.r_[xs, fpr_limit], np.r_[ys, y_limit]
    return float(np.trapezoid(ys, xs) / fpr_limit)


def _pro_curve(sorted_normal: np.ndarray, sorted_weights: np.ndarray, ends: np.ndarray,
               sorted_scores: np.ndarray, num_thresholds: int | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` from ``(0, 0)`` at every distinct score (exact) or on an even grid of thresholds;
    inputs in descending score order."""
    cum_normal = np.cumsum(sorted_normal, dtype=np.int64)
    cum_pro = np.cumsum(sorted_weights)
    if num_thresholds is None:
        picks = ends
    else:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2 or None (exact), got {num_thresholds}")
        thresholds = np.linspace(sorted_scores[0], sorted_scores[-1], num_thresholds)
        ascending = sorted_scores[::-1]
        # number of scores >= t, minus one: the last sorted position taken at threshold t
        picks = sorted_scores.size - np.searchsorted(ascending, thresholds, side="left") - 1
    fpr = np.r_[0.0, cum_normal[picks] / cum_normal[-1]]
    pro = np.r_[0.0, cum_pro[picks]]
    return fpr, pro


def _aupro_sorted(masks: np.ndarray, order: np.ndarray, ends: np.ndarray,
                  sorted_scores: np.ndarray, fpr_limit: float, num_thresholds: int | None) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    weights, num_regions = region_weights(masks)
    if num_regions == 0:
        return _undefined("AUPRO undefined: the masks contain no defect region; returning NaN")
    normal = (np.asarray(masks) == 0).ravel()
    if not normal.any():
        return _undefined("AUPRO undefined: the masks contain no normal pixel; returning NaN")
    fpr, pro = _pro_curve(normal[order], weights[order], ends, sorted_scores, num_thresholds)
    return _integrate_pro(fpr, pro, fpr_limit)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap curve up to a false-positive rate.

    PRO(t) is the mean over all defect regions (8-connected components of every mask) of the
    fraction of the region's pixels with ``map >= t``; FPR(t) is the fraction of all normal
    pixels with ``map >= t``. PRO is integrated over FPR in [0, fpr_limit] (trapezoid, the point
    at ``fpr_limit`` interpolated) and divided by ``fpr_limit``.

    Args:
        masks: ``(N, H, W)`` ground truth, non-zero = defect.
        maps: ``(N, H, W)`` anomaly maps.
        fpr_limit: Upper FPR bound in (0, 1].
        num_thresholds: None for the exact curve (every distinct map value), else this many
            evenly spaced thresholds between the map's max and min.

    Returns:
        AUPRO in [0, 1]; NaN (with a warning) if there is no defect region or no normal pixel.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    scores = _as_scores(maps, "maps", masks.size)
    order, ends = _descending_sort(scores)
    return _aupro_sorted(masks, order, ends, scores[order], fpr_limit, num_thresholds)


def class_metrics(image_labels: ArrayLike, image_scores: ArrayLike, masks: np.ndarray,
                  maps: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """All detection and localisation metrics of one class.

    The pixel metrics pool every pixel of every test image of the class; the pixels are sorted
    once and the same exact curve gives pixel AUROC, pixel AP and AUPRO.

    Args:
        image_labels: ``(N,)`` 0 = good, 1 = defect.
        image_scores: ``(N,)`` image anomaly scores.
        masks: ``(N, H, W)`` ground-truth masks (non-zero = defect).
        maps: ``(N, H, W)`` pixel anomaly maps.
        fpr_limit: FPR bound of AUPRO.

    Returns:
        ``{'img_auroc', 'img_ap', 'pixel_auroc', 'pixel_ap', 'aupro'}`` as floats.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or np.shape(maps) != masks.shape:
        raise ValueError(f"masks and maps must both be (N, H, W); got {masks.shape} and "
                         f"{np.shape(maps)}")
    if len(masks) != np.size(image_labels):
        raise ValueError(f"{np.size(image_labels)} image labels but {len(masks)} masks")
    results = {"img_auroc": auroc(image_labels, image_scores),
               "img_ap": average_precision(image_labels, image_scores)}
    pixel_labels = _as_binary(masks != 0, "masks")
    pixel_scores = _as_scores(maps, "maps", pixel_labels.size)
    order, ends = _descending_sort(pixel_scores)
    if reason := _check_two_classes(pixel_labels, "pixel AUROC/AP"):
        results["pixel_auroc"] = results["pixel_ap"] = _undefined(reason)
    else:
        fps, tps = _counts(pixel_labels[order], ends)
        results["pixel_auroc"] = _auroc_from_counts(fps, tps)
        results["pixel_ap"] = _ap_from_counts(fps, tps)
    results["aupro"] = _aupro_sorted(masks, order, ends, pixel_scores[order], fpr_limit, None)
    return results


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """``{metric: unweighted mean over the rows}`` (one row per class) for each metric of ``METRIC_NAMES``
    that every row has, in that order; NaN propagates."""
    if not rows:
        return {}
    keys = [k for k in METRIC_NAMES if all(k in row for row in rows)]
    return {k: float(np.mean([row[k] for row in rows])) for k in keys}
