"""Per task, once trained: the decision threshold (a quantile of its held-out good training images'
image scores under its own expert) and the router's unknown-class limit. Fixed after the task, like its
expert and memory; stored in the checkpoint.

Router limit: ``ROUTER_LIMIT_MARGIN`` x the largest router distance (square root of the router's squared
Mahalanobis or Euclidean distance) of the task's held-out images to its prototype; none without held-out
images. Training images do not count: their distances are in-sample, about half a new good image's. The
margin keeps a known class's defective images on the known side. Measured on MVTec AD hazelnut and
transistor (efficientnet_lite0, 224 px, 45 training and 5 held-out images each): training images
5.8-7.4, held-out 11.7-16.2, good test 13.3-19.2, defective 15.0-30.0 (1.85 x the held-out maximum),
the other class's images 146.7-168.8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import Tensor

from moleflow.evaluation.evaluator import ScoreSettings, score_features
from moleflow.evaluation.thresholds import quantile_threshold
from moleflow.extractors.features import FeatureSet
from moleflow.models.memory import PatchMemory
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.models.routing import PrototypeRouter
from moleflow.utils.precision import matmul_tf32

ROUTER_LIMIT_MARGIN = 3.0


@dataclass
class TaskCalibration:
    """One task's threshold and router limit.

    Attributes:
        threshold: image-score threshold (None: no held-out images, ``--val_fraction 0``).
        quantile: the ``--threshold_quantile`` it was set with.
        held_out_scores: the held-out images' image scores.
        router_limit: router distance above which an image routed to this task is of an unknown class
            (None: no held-out images).
        held_out_distance_max: the largest router distance of its held-out images.
        train_distance_max: the largest router distance of its training images (in-sample).
        normal_level: the median patch score of the held-out images (where predict's heat maps start).
    """

    threshold: Optional[float]
    quantile: float
    held_out_scores: list[float] = field(default_factory=list)
    router_limit: Optional[float] = None
    held_out_distance_max: Optional[float] = None
    train_distance_max: Optional[float] = None
    normal_level: Optional[float] = None

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "TaskCalibration":
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})


class Calibration:
    """Every trained task's :class:`TaskCalibration`, in task order."""

    def __init__(self, tasks: Optional[list[TaskCalibration]] = None) -> None:
        self.tasks: list[TaskCalibration] = list(tasks or [])

    def set(self, task_id: int, calibration: TaskCalibration) -> None:
        """Task ``task_id``'s calibration; tasks before it without one (a checkpoint written before
        thresholds existed) get none."""
        while len(self.tasks) <= task_id:
            self.tasks.append(TaskCalibration(threshold=None, quantile=calibration.quantile))
        self.tasks[task_id] = calibration

    def thresholds(self) -> list[Optional[float]]:
        return [t.threshold for t in self.tasks]

    def router_limits(self) -> list[Optional[float]]:
        return [t.router_limit for t in self.tasks]

    def state(self) -> list[dict]:
        return [t.state() for t in self.tasks]

    @classmethod
    def from_state(cls, state: Optional[list[dict]]) -> "Calibration":
        """From ``state()``; a checkpoint written before thresholds existed has none (None)."""
        return cls([TaskCalibration.from_state(s) for s in state or []])


def router_distances(router: PrototypeRouter, features: Tensor, device: torch.device) -> Tensor:
    """(N, D) router features -> (N, T) distances to every prototype (square roots of the router's
    squared distances), in full float32, on ``device``."""
    with matmul_tf32(device, False):
        return router.distances(features.to(device)).clamp_min(0.0).sqrt()


def calibrate_task(model: MoLESpatialAwareNF, memory: Optional[PatchMemory], router: PrototypeRouter,
                   settings: ScoreSettings, device: torch.device, task_id: int, quantile: float,
                   held_out: Optional[FeatureSet], train_router: Optional[Tensor],
                   previous: Optional[TaskCalibration] = None) -> TaskCalibration:
    """Threshold and router limit of the trained task ``task_id``.

    Args:
        model, memory, router, settings, device: the run's parts after the task was trained.
        quantile: ``--threshold_quantile``.
        held_out: the task's held-out images' features (None or empty: no threshold).
        train_router: (N, D) router features of its training images; None keeps ``previous``'s
            router limit and distances (a re-evaluation changes the scores, not the router).
        previous: the task's earlier calibration.
    """
    scores: list[float] = []
    level = None
    if held_out is not None and len(held_out):
        ids = torch.full((len(held_out),), task_id, dtype=torch.long)
        patches, images = score_features(model, memory, held_out.patches, ids, settings, device)
        scores, level = images.cpu().double().tolist(), float(patches.float().median())
    keep = previous or TaskCalibration(threshold=None, quantile=quantile)
    limit, held_max, train_max = keep.router_limit, keep.held_out_distance_max, keep.train_distance_max
    if train_router is not None and task_id < router.num_tasks:
        train_max = float(router_distances(router, train_router, device)[:, task_id].max())
        if held_out is not None and len(held_out):
            held_max = float(router_distances(router, held_out.router, device)[:, task_id].max())
            limit = ROUTER_LIMIT_MARGIN * held_max
    return TaskCalibration(threshold=quantile_threshold(scores, quantile), quantile=quantile, held_out_scores=scores,
                           router_limit=limit, held_out_distance_max=held_max, train_distance_max=train_max,
                           normal_level=level)
