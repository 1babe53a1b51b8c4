"""--run_diagnostics: gather latents, log-dets, scores and maps of a finished run and plot them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from moleflow.data import AnomalyDataset
from moleflow.utils.diagnostics import (
    plot_accuracy_matrix, plot_anomaly_overlays, plot_confusion_matrix, plot_latent_vs_gaussian,
    plot_logdet_spread, plot_score_distributions, plot_znorm_vs_logdet,
)

if TYPE_CHECKING:  # pragma: no cover
    from moleflow.evaluation.evaluator import ClassEvaluation
    from moleflow.runner import Run

MAX_LATENT_SAMPLES = 50_000
OVERLAYS_PER_KIND = 2


@torch.no_grad()
def _latents(run: "Run", patches: torch.Tensor, routed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: a few latent coordinates, mean log-det and mean |z| over patches, with the routed expert."""
    coords, log_dets, norms = [], [], []
    for i in range(patches.shape[0]):
        z, log_det = run.model(patches[i:i + 1].to(run.device), int(routed[i]))
        z = z.float().cpu().reshape(-1, z.shape[-1])
        coords.append(z[:: max(1, z.shape[0] // 16)].reshape(-1))
        log_dets.append(log_det.float().mean().cpu())
        norms.append(z.norm(dim=1).mean())
    return torch.cat(coords), torch.stack(log_dets), torch.stack(norms)


def write_diagnostics(run: "Run", results: list["ClassEvaluation"], confusion: Optional[torch.Tensor]) -> Path:
    """Write the flow-analysis PNGs into <exp_dir>/diagnostics/ and return that folder."""
    out = run.exp_dir / "diagnostics"
    out.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    good_latents, all_logdet, all_norm, all_labels = [], [], [], []
    for result in results:
        name = result.row["class_name"]
        test = run.test_cache[name]
        labels = test.labels.numpy()
        coords, log_det, norm = _latents(run, test.patches, result.routed)
        good = torch.from_numpy(labels == 0)
        if good.any():
            per_image = coords.reshape(len(labels), -1)[good].reshape(-1)
            good_latents.append(per_image)
        all_logdet.append(log_det.numpy())
        all_norm.append(norm.numpy())
        all_labels.append(labels)
        plot_score_distributions(result.image_scores.numpy(), labels, name, out / f"scores_{name}.png")
        picks = [*np.flatnonzero(labels == 0)[:OVERLAYS_PER_KIND], *np.flatnonzero(labels == 1)[:OVERLAYS_PER_KIND]]
        dataset = AnomalyDataset([run.splits[name].test[i] for i in picks], run.config.img_size)
        images = torch.stack([dataset[k]["image"] for k in range(len(picks))]).numpy()
        titles = [f"{name} {'defect' if labels[i] else 'good'} #{i} score {result.image_scores[i]:.1f}" for i in picks]
        plot_anomaly_overlays(images, result.maps[picks].numpy(), test.masks[picks].numpy(), titles,
                              out / f"overlays_{name}.png")
    latents = torch.cat(good_latents) if good_latents else torch.zeros(0)
    if latents.numel() > MAX_LATENT_SAMPLES:
        latents = latents[torch.randperm(latents.numel(), generator=gen)[:MAX_LATENT_SAMPLES]]
    plot_latent_vs_gaussian(latents.numpy(), out / "latent_vs_gaussian.png")
    plot_logdet_spread(np.concatenate(all_logdet), out / "logdet_spread.png")
    plot_znorm_vs_logdet(np.concatenate(all_norm), np.concatenate(all_logdet), np.concatenate(all_labels),
                         out / "znorm_vs_logdet.png")
    names = ["+".join(t) for t in run.tasks]
    if confusion is not None:  # None: oracle run (no router), nothing was routed
        plot_confusion_matrix(confusion.numpy(), names, out / "routing_confusion.png")
    for metric, matrix in run.matrices.items():
        if metric == "routing_acc" and confusion is None:
            continue
        plot_accuracy_matrix(matrix.values, names, metric, out / f"accuracy_matrix_{metric}.png")
    run.log.info(f"diagnostics written to {out}")
    return out
