"""Run the frozen backbone once over a dataset and keep the features (the backbone never trains)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


@dataclass
class FeatureSet:
    """Backbone outputs for a list of images.

    Attributes:
        patches: (N, H, W, D) patch features (on ``storage`` device).
        router: (N, D) router features: mean of the patch features over the grid.
        labels: (N,) 0 good / 1 defect.
        masks: (N, S, S) uint8 ground-truth masks (zeros for good images), or None.
    """

    patches: Tensor
    router: Tensor
    labels: Tensor
    masks: Optional[Tensor]

    def __len__(self) -> int:
        return self.patches.shape[0]


@torch.no_grad()
def extract_features(extractor: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                     storage: torch.device, keep_masks: bool, desc: str = "extract",
                     num_workers: int = 0, progress: bool = True) -> FeatureSet:
    """Run ``extractor`` over ``dataset`` (items: dict with image, mask, label).

    Args:
        extractor: frozen backbone, (B, 3, S, S) -> (B, H, W, D).
        dataset: AnomalyDataset.
        batch_size: images per forward pass.
        device: where the backbone runs.
        storage: where the features are kept (the GPU when there is one).
        keep_masks: keep the masks (test sets) or drop them (training sets).
        desc: progress-bar label.
        num_workers: DataLoader workers.
        progress: show a tqdm bar.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    patches, labels, masks = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        feats = extractor(batch["image"].to(device, non_blocking=True))
        patches.append(feats.float().to(storage))
        labels.append(torch.as_tensor(batch["label"]))
        if keep_masks:
            masks.append((batch["mask"][:, 0] > 0.5).to(torch.uint8))
    all_patches = torch.cat(patches)
    return FeatureSet(patches=all_patches, router=all_patches.mean(dim=(1, 2)),
                      labels=torch.cat(labels), masks=torch.cat(masks) if keep_masks else None)
