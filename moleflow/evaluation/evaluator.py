"""Score cached test features with the routed (or true) expert and compute per-class metrics.

On the CPU everything runs as plain numpy/torch. On a GPU the patch scores, anomaly maps, image
scores and pixel metrics stay on the device (``metrics_torch``: the same exact curves), scoring
uses larger batches, and the flow's matrix products may use TF32 (``tf32=True``); routing is
always computed in full float32 so the expert choice does not depend on that setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moleflow.distributed import by_rows
from moleflow.evaluation import metrics_torch
from moleflow.evaluation.anomaly_map import anomaly_maps, image_scores
from moleflow.evaluation.metrics import class_metrics
from moleflow.models.loss import patch_nll
from moleflow.models.memory import PatchMemory, TaskMemory, fit_task_memory
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.models.routing import PrototypeRouter
from moleflow.extractors.features import FeatureSet
from moleflow.utils.precision import matmul_tf32

GPU_SCORE_BATCH = 128  # images per flow pass when scoring on a GPU


@dataclass(frozen=True)
class ScoreSettings:
    """How test images are scored; the fields are the ``AblationConfig`` settings of the same names
    (``moleflow.build.score_settings``)."""

    batch_size: int
    anomaly_score: str
    memory_size: int
    memory_weight: float
    score_aggregation_mode: str
    score_aggregation_top_k: int
    score_aggregation_percentile: float
    anomaly_map_sigma: float
    tf32: bool
    seed: int


@dataclass
class ClassEvaluation:
    """Result of evaluating one class.

    Attributes:
        row: task_id, class_name, routing_acc (NaN when the true task was given) and the metrics
            (class_metrics keys).
        routed: (N,) task ids used for each test image.
        image_scores: (N,) image anomaly scores.
        maps: (N, S, S) anomaly maps (kept only when asked, for diagnostics).
    """

    row: dict
    routed: Tensor
    image_scores: Tensor
    maps: Optional[Tensor]


@torch.no_grad()
def score_patches(model: MoLESpatialAwareNF, patches: Tensor, task_ids: Tensor, batch_size: int,
                  device: torch.device, tf32: bool = False) -> Tensor:
    """Patch NLL scores with each image's own expert, ``batch_size`` images per pass in their order; a
    batch of mixed experts runs in one pass with one task id per image (``MoLESpatialAwareNF``).

    Args:
        patches: (N, H, W, D) features.
        task_ids: (N,) expert per image.
        tf32: on CUDA, let the flow's matrix products use TF32.

    Returns:
        (N, H, W) patch scores (nats), on the CPU, or on ``device`` when it is a GPU.
    """
    keep_on_device = device.type == "cuda"
    out = torch.empty(patches.shape[:3], dtype=torch.float32, device=device if keep_on_device else "cpu")
    task_ids = task_ids.cpu()
    if len(task_ids) and not 0 <= int(task_ids.min()) <= int(task_ids.max()) < model.num_tasks:
        raise IndexError(f"task ids {int(task_ids.min())}..{int(task_ids.max())} out of range "
                         f"(the model has {model.num_tasks} tasks)")
    on_device = task_ids.to(device)  # one copy: no host wait for the GPU before each batch
    with matmul_tf32(device, tf32):
        for start in range(0, len(task_ids), batch_size):
            stop = min(start + batch_size, len(task_ids))
            ids = task_ids[start:stop]
            task: int | Tensor = int(ids[0]) if bool((ids == ids[0]).all()) else on_device[start:stop]
            z, log_det = model(patches[start:stop].to(device), task)
            scores = patch_nll(z, log_det).float()
            out[start:stop] = scores if keep_on_device else scores.cpu()
    return out


def score_batch(settings: ScoreSettings, device: torch.device) -> int:
    """Images per flow pass when scoring: larger batches on a GPU."""
    twice = max(1, 2 * settings.batch_size)
    return max(GPU_SCORE_BATCH, twice) if device.type == "cuda" else twice


def patch_scores(model: MoLESpatialAwareNF, memory: Optional[PatchMemory], patches: Tensor, task_ids: Tensor,
                 settings: ScoreSettings, device: torch.device) -> Tensor:
    """(N, H, W) patch anomaly scores as ``settings.anomaly_score`` asks: the flow's NLL, the
    memory distance, or both standardised and fused (``moleflow.models.memory``). Under torchrun
    each process scores its block of the images and all get every score (``distributed.by_rows``)."""
    mode = settings.anomaly_score

    def block(lo: int, hi: int) -> Tensor:
        part, ids = patches[lo:hi], task_ids[lo:hi]
        flow = None if mode == "memory" else score_patches(model, part, ids, score_batch(settings, device), device,
                                                           tf32=settings.tf32)
        if mode == "flow":
            return flow
        if memory is None:
            raise ValueError(f"--anomaly_score {mode} needs the per-task patch memory")
        target = flow.device if flow is not None else (device if device.type == "cuda" else torch.device("cpu"))
        with matmul_tf32(device, False):
            return memory.fuse(flow, part.to(target), ids, 1.0 if mode == "memory" else settings.memory_weight)

    return by_rows(block, len(task_ids))


def score_features(model: MoLESpatialAwareNF, memory: Optional[PatchMemory], patches: Tensor, task_ids: Tensor,
                   settings: ScoreSettings, device: torch.device) -> tuple[Tensor, Tensor]:
    """The one scoring path of evaluation, thresholds, predict and the API: (N, H, W, D) features
    with (N,) experts -> ((N, H, W) patch scores, (N,) image scores from the unsmoothed patch scores),
    on the CPU, or on ``device`` when it is a GPU."""
    scores = patch_scores(model, memory, patches, task_ids, settings, device)
    return scores, image_scores(scores, method=settings.score_aggregation_mode, k=settings.score_aggregation_top_k,
                                percentile=settings.score_aggregation_percentile)


def task_memory(model: MoLESpatialAwareNF, train: FeatureSet, task_id: int, settings: ScoreSettings,
                device: torch.device) -> TaskMemory:
    """Task ``task_id``'s patch memory from its training features, with the statistics that
    standardise its scores: the trained flow's NLL on the same patches when the score is fused."""
    flow = None
    if settings.anomaly_score == "fused":
        ids = torch.full((len(train),), task_id, dtype=torch.long)
        flow = score_patches(model, train.patches, ids, score_batch(settings, device), device, tf32=settings.tf32)
    with matmul_tf32(device, False):
        return fit_task_memory(train.patches, flow, settings.memory_size, seed=settings.seed * 131 + task_id)


def route(router: PrototypeRouter, features: Tensor, device: torch.device) -> Tensor:
    """(N, D) router features -> (N,) task ids on the CPU; distances in full float32 (never TF32)."""
    with matmul_tf32(device, False):
        return router.route(features.to(device)).cpu()


def evaluate_class(model: MoLESpatialAwareNF, test: FeatureSet, class_name: str, true_task: int,
                   settings: ScoreSettings, device: torch.device, routed: Optional[Tensor] = None,
                   keep_maps: bool = False, memory: Optional[PatchMemory] = None) -> ClassEvaluation:
    """Score and measure one class's test set.

    Args:
        test: cached test features with labels and masks.
        true_task: the task the class was learned in.
        routed: (N,) the expert the router picked for each image (``route``); None: the true task
            is used (oracle, or no router), and no routing accuracy is reported (NaN).
        keep_maps: return the anomaly maps (on the CPU).
        memory: the per-task patch memories; needed unless ``settings.anomaly_score`` is 'flow'.
    """
    task_ids = torch.full((len(test),), true_task, dtype=torch.long) if routed is None else routed
    scores, img = score_features(model, memory, test.patches, task_ids, settings, device)
    masks = test.masks.to(scores.device)
    maps = anomaly_maps(scores, out_size=tuple(masks.shape[-2:]), sigma=settings.anomaly_map_sigma)
    if device.type == "cuda":
        if test.regions is None or test.regions[0].device != masks.device:
            test.regions = metrics_torch.region_weights(masks)
        metrics = metrics_torch.class_metrics(test.labels, img, masks, maps, regions=test.regions)
    else:
        metrics = class_metrics(test.labels.numpy(), img.numpy(), masks.numpy().astype(bool), maps.numpy())
    routing = float("nan") if routed is None else float((routed == true_task).float().mean())
    row = {"task_id": true_task, "class_name": class_name, "routing_acc": routing, **metrics}
    return ClassEvaluation(row=row, routed=task_ids, image_scores=img.cpu(),
                           maps=maps.cpu() if keep_maps else None)
