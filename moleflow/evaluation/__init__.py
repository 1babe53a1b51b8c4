"""Evaluation: anomaly maps, metrics (pure functions) and continual accuracy matrices."""

from moleflow.evaluation.anomaly_map import SCORE_METHODS, anomaly_maps, gaussian_blur, image_scores
from moleflow.evaluation.continual import ContinualMatrix, write_continual_summary
from moleflow.evaluation.metrics import (
    METRIC_NAMES, MetricUndefinedWarning, aupro, auroc, average_precision, class_metrics,
    mean_metrics,
)

__all__ = [
    "SCORE_METHODS", "anomaly_maps", "gaussian_blur", "image_scores",
    "ContinualMatrix", "write_continual_summary",
    "METRIC_NAMES", "MetricUndefinedWarning", "aupro", "auroc", "average_precision",
    "class_metrics", "mean_metrics",
]
