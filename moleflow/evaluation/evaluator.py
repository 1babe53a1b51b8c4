"""Score cached test features with the routed (or true) expert and compute per-class metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moleflow.config.ablation import AblationConfig
from moleflow.evaluation.anomaly_map import anomaly_maps, image_scores
from moleflow.evaluation.metrics import class_metrics
from moleflow.models.loss import patch_nll
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.models.routing import PrototypeRouter
from moleflow.trainer.features import FeatureSet


@dataclass
class ClassEvaluation:
    """Result of evaluating one class.

    Attributes:
        row: task_id, class_name, routing_acc and the metrics (class_metrics keys).
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
                  device: torch.device) -> Tensor:
    """Patch NLL scores with each image's own expert.

    Args:
        model: the flow.
        patches: (N, H, W, D) features.
        task_ids: (N,) expert per image.
        batch_size: images per forward pass.
        device: where the flow runs.

    Returns:
        (N, H, W) patch scores (nats), on the CPU.
    """
    out = torch.empty(patches.shape[:3], dtype=torch.float32)
    task_ids = task_ids.cpu()
    for task in task_ids.unique().tolist():
        idx = (task_ids == task).nonzero().flatten()
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            feats = patches[chunk.to(patches.device)].to(device)
            z, log_det = model(feats, int(task))
            out[chunk] = patch_nll(z, log_det).float().cpu()
    return out


def evaluate_class(model: MoLESpatialAwareNF, router: PrototypeRouter, test: FeatureSet, class_name: str,
                   true_task: int, config: AblationConfig, device: torch.device, oracle: bool,
                   keep_maps: bool = False) -> ClassEvaluation:
    """Route, score and measure one class's test set.

    Args:
        model: the flow.
        router: prototypes of the tasks seen so far.
        test: cached test features with labels and masks.
        class_name: the class.
        true_task: the task the class was learned in.
        config: run settings (batch size, scoring, switches).
        device: where the flow runs.
        oracle: use the true task instead of the router.
        keep_maps: return the anomaly maps.
    """
    n = len(test)
    if oracle or not config.use_router:
        routed = torch.full((n,), true_task, dtype=torch.long)
    else:
        routed = router.route(test.router.to(device)).cpu()
    scores = score_patches(model, test.patches, routed, max(1, 2 * config.batch_size), device)
    img = image_scores(scores, method=config.score_aggregation_mode, k=config.score_aggregation_top_k,
                       percentile=config.score_aggregation_percentile)
    masks = test.masks
    maps = anomaly_maps(scores, out_size=tuple(masks.shape[-2:]), sigma=config.anomaly_map_sigma)
    metrics = class_metrics(test.labels.numpy(), img.numpy(), masks.numpy().astype(bool), maps.numpy())
    row = {"task_id": true_task, "class_name": class_name,
           "routing_acc": float((routed == true_task).float().mean()), **metrics}
    return ClassEvaluation(row=row, routed=routed, image_scores=img, maps=maps if keep_maps else None)

