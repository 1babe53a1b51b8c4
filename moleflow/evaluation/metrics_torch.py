"""The pixel metrics of :func:`moleflow.evaluation.metrics.class_metrics` on torch tensors (GPU).

Same exact curves as the numpy functions (counts at the end of each run of equal values, so the order
of ties does not matter). Integer counts are exact; float64 sums differ from numpy's only in summation
order (~1e-15). Undefined cases go to the numpy functions, which return NaN with their warning.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from moleflow.evaluation import metrics as np_metrics


def _trapezoid(y: Tensor, x: Tensor) -> float:
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1])).sum() / 2.0)


def _sorted_curve(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Descending sort order ``(P,)`` and the last sorted position of each distinct score ``(m,)``."""
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    change = (sorted_scores[1:] != sorted_scores[:-1]).nonzero().flatten()
    last = torch.full((1,), scores.numel() - 1, dtype=change.dtype, device=scores.device)
    return order, torch.cat([change, last])


def _integrate_pro(fpr: Tensor, pro: Tensor, fpr_limit: float) -> float:
    """Area under PRO(FPR) on [0, fpr_limit] / fpr_limit (as ``metrics._integrate_pro``)."""
    limit = torch.tensor([fpr_limit], dtype=fpr.dtype, device=fpr.device)
    inside = int(torch.searchsorted(fpr, limit, right=True))
    xs, ys = fpr[:inside], pro[:inside]
    area = _trapezoid(ys, xs) if inside > 1 else 0.0
    x_last, y_last = float(xs[-1]), float(ys[-1])
    if x_last < fpr_limit:
        x0, x1 = float(fpr[inside - 1]), float(fpr[inside])
        y0, y1 = float(pro[inside - 1]), float(pro[inside])
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (fpr_limit - x_last) * (y_last + y_limit) / 2.0
    return area / fpr_limit


def region_weights(masks: Tensor) -> tuple[Tensor, int]:
    """Per-pixel PRO weights ``(N*H*W,)`` float64 on ``masks``' device and the region count (the
    8-connected components are labelled on the CPU by ``metrics.region_weights``)."""
    weights, num_regions = np_metrics.region_weights(masks.cpu().numpy())
    return torch.from_numpy(weights).to(masks.device), num_regions


def pixel_metrics(masks: Tensor, maps: Tensor, fpr_limit: float = 0.3,
                  regions: Optional[tuple[Tensor, int]] = None) -> dict[str, float]:
    """Pixel AUROC, pixel AP and AUPRO of one class, computed where the tensors are.

    Args:
        masks: ``(N, H, W)`` ground truth, non-zero = defect (any device).
        maps: ``(N, H, W)`` anomaly maps, same device as ``masks``.
        fpr_limit: FPR bound of AUPRO, in (0, 1].
        regions: :func:`region_weights` of ``masks`` if already known.

    Returns:
        ``{'pixel_auroc', 'pixel_ap', 'aupro'}`` as floats.

    Raises:
        ValueError: Shapes differ or a map value is NaN/inf.
    """
    if masks.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be (N, H, W); got {tuple(masks.shape)} and {tuple(maps.shape)}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores = maps.flatten()
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"maps contains {bad} NaN/inf values (a diverged flow?); metrics need finite scores")
    defect = (masks != 0).flatten()
    n_pos = int(defect.sum())
    weights, num_regions = regions if regions is not None else region_weights(masks)
    if n_pos in (0, defect.numel()) or num_regions == 0:  # undefined somewhere: numpy says why
        return _numpy_pixel_metrics(masks.cpu().numpy(), maps.cpu().numpy(), fpr_limit)
    order, ends = _sorted_curve(scores)
    defect_sorted = defect[order]
    tps = torch.cumsum(defect_sorted, 0)[ends]
    fps = ends + 1 - tps
    fpr = torch.cat([tps.new_zeros(1, dtype=torch.float64), fps.double() / fps[-1]])
    tpr = torch.cat([tps.new_zeros(1, dtype=torch.float64), tps.double() / tps[-1]])
    precision = tps.double() / (tps + fps).double()
    recall = tps.double() / tps[-1]
    results = {"pixel_auroc": _trapezoid(tpr, fpr),
               "pixel_ap": float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())}
    cum_pro = torch.cumsum(weights.to(scores.device)[order], 0)
    pro = torch.cat([cum_pro.new_zeros(1), cum_pro[ends]])
    results["aupro"] = _integrate_pro(fpr, pro, fpr_limit)  # normal pixels above t = fps, so same FPR
    return results


def _numpy_pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> dict[str, float]:
    labels = masks != 0
    return {"pixel_auroc": np_metrics.auroc(labels, maps), "pixel_ap": np_metrics.average_precision(labels, maps),
            "aupro": np_metrics.aupro(masks, maps, fpr_limit)}


def class_metrics(image_labels: Tensor, image_scores: Tensor, masks: Tensor, maps: Tensor,
                  fpr_limit: float = 0.3, regions: Optional[tuple[Tensor, int]] = None) -> dict[str, float]:
    """:func:`moleflow.evaluation.metrics.class_metrics` on tensors: the image metrics (``(N,)`` labels and
    scores) with numpy, the pixel metrics of ``(N, H, W)`` masks and maps (on the same device) there
    (:func:`pixel_metrics`, same ``regions``)."""
    if len(masks) != image_labels.numel():
        raise ValueError(f"{image_labels.numel()} image labels but {len(masks)} masks")
    labels = image_labels.cpu().numpy()
    scores = image_scores.double().cpu().numpy()
    results = {"img_auroc": np_metrics.auroc(labels, scores), "img_ap": np_metrics.average_precision(labels, scores)}
    results.update(pixel_metrics(masks, maps, fpr_limit, regions))
    return results
