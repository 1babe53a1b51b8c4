"""--run_diagnostics: latents, log-dets, scores and maps of a finished run, plotted.

``class_diagnostics`` gathers what one class's plots need (the flow's latents of its test images
under their routed experts, a few images for the overlays); ``write_diagnostics`` plots plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from moleflow.data import AnomalyDataset
from moleflow.evaluation.evaluator import ClassEvaluation
from moleflow.evaluation.plots import (
    plot_accuracy_matrix, plot_anomaly_overlays, plot_confusion_matrix, plot_latent_vs_gaussian,
    plot_logdet_spread, plot_score_distributions, plot_znorm_vs_logdet,
)
from moleflow.extractors.features import FeatureSet
from moleflow.models.mole_nf import MoLESpatialAwareNF

MAX_LATENT_SAMPLES = 50_000
OVERLAYS_PER_KIND = 2


@dataclass
class ClassDiagnostics:
    """What the plots of one class need (N test images, P overlay picks, side S)."""

    name: str
    labels: np.ndarray          # (N,) 0 good / 1 defect
    image_scores: np.ndarray    # (N,) image anomaly scores
    coords: torch.Tensor        # (N, K) a few latent coordinates per image
    log_det: np.ndarray         # (N,) mean log-det over each image's patches
    z_norm: np.ndarray          # (N,) mean |z| over each image's patches
    picks: list[int]            # indices of the overlay images (overlay_picks)
    titles: list[str]           # one per pick: defect type, file name, score
    images: np.ndarray          # (P, 3, S, S) the picks, ImageNet-normalised
    maps: np.ndarray            # (P, S, S) their anomaly maps
    masks: np.ndarray           # (P, S, S) their ground truth


@torch.no_grad()
def class_diagnostics(model: MoLESpatialAwareNF, device: torch.device, test: FeatureSet, result: ClassEvaluation,
                      images: AnomalyDataset) -> ClassDiagnostics:
    """One class's latents (each image through its routed expert), scores and overlay images.

    Args:
        test: the class's test features (labels, masks).
        result: its routed evaluation, with maps (``keep_maps``).
        images: its test images, in the order of ``test`` (decoded here for the overlays only).
    """
    coords, log_dets, norms = [], [], []
    for i in range(test.patches.shape[0]):
        z, log_det = model(test.patches[i:i + 1].to(device), int(result.routed[i]))
        z = z.float().cpu().reshape(-1, z.shape[-1])
        coords.append(z[:: max(1, z.shape[0] // 16)].reshape(-1))
        log_dets.append(log_det.float().mean().cpu())
        norms.append(z.norm(dim=1).mean())
    labels, scores = test.labels.numpy(), result.image_scores.numpy()
    picks = overlay_picks(labels, scores)
    titles = [f"{images.samples[i].defect_type}/{images.samples[i].image_path.name} score {scores[i]:.2f}"
              for i in picks]
    return ClassDiagnostics(result.row["class_name"], labels, scores, torch.stack(coords),
                            torch.stack(log_dets).numpy(), torch.stack(norms).numpy(), picks, titles,
                            torch.stack([images[i]["image"] for i in picks]).numpy(), result.maps[picks].numpy(),
                            test.masks[picks].numpy())


def overlay_picks(labels: np.ndarray, scores: np.ndarray, per_kind: int = OVERLAYS_PER_KIND) -> list[int]:
    """The images most telling about failures: the ``per_kind`` highest-scored good images, then the
    ``per_kind`` lowest-scored defective ones (each group from the worst)."""
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    good = good[np.argsort(-scores[good], kind="stable")][:per_kind]
    bad = bad[np.argsort(scores[bad], kind="stable")][:per_kind]
    return [*good.tolist(), *bad.tolist()]


def write_diagnostics(out: Path, classes: Sequence[ClassDiagnostics], matrices: dict[str, np.ndarray],
                      task_names: list[str], confusion: Optional[np.ndarray]) -> Path:
    """Write the flow-analysis PNGs into ``out`` (``<exp_dir>/diagnostics``, created) and return it.

    Args:
        classes: per class, ``class_diagnostics``.
        matrices: metric -> accuracy matrix R[i][j].
        confusion: true x routed task counts; None for an oracle run (nothing was routed).
    """
    out.mkdir(exist_ok=True)
    good_latents = []
    for c in classes:
        good = torch.from_numpy(c.labels == 0)
        if good.any():
            good_latents.append(c.coords[good].reshape(-1))
        plot_score_distributions(c.image_scores, c.labels, c.name, out / f"scores_{c.name}.png")
        plot_anomaly_overlays(c.images, c.maps, c.masks, [f"{c.name} {t}" for t in c.titles],
                              out / f"overlays_{c.name}.png")
    latents = torch.cat(good_latents) if good_latents else torch.zeros(0)
    if latents.numel() > MAX_LATENT_SAMPLES:
        gen = torch.Generator().manual_seed(0)
        latents = latents[torch.randperm(latents.numel(), generator=gen)[:MAX_LATENT_SAMPLES]]
    plot_latent_vs_gaussian(latents.numpy(), out / "latent_vs_gaussian.png")
    log_dets = np.concatenate([c.log_det for c in classes])
    plot_logdet_spread(log_dets, out / "logdet_spread.png")
    plot_znorm_vs_logdet(np.concatenate([c.z_norm for c in classes]), log_dets,
                         np.concatenate([c.labels for c in classes]), out / "znorm_vs_logdet.png")
    if confusion is not None:
        plot_confusion_matrix(confusion, task_names, out / "routing_confusion.png")
    for metric, values in matrices.items():
        plot_accuracy_matrix(values, task_names, metric, out / f"accuracy_matrix_{metric}.png")
    return out
