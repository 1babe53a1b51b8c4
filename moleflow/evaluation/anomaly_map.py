"""Patch scores -> pixel anomaly maps and image scores (pure torch functions, CPU or GPU).

The flow gives one negative log-likelihood per patch, ``S`` of shape ``(B, h, w)`` in nats.
The pixel map is ``S`` upsampled bilinearly to the image size and blurred with a Gaussian
(sigma = 4 px); the image score is computed from the *unsmoothed* patch scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moleflow.utils.precision import conv_tf32

SCORE_METHODS: tuple[str, ...] = ("top_k", "max", "mean", "percentile")


def _reflect_indices(size: int, radius: int, device: torch.device) -> Tensor:
    """``(size + 2 * radius,)`` indices of a reflect-padded axis (mirrored without repeating the edge);
    unlike ``F.pad(mode='reflect')``, also for a padding wider than the axis."""
    positions = torch.arange(-radius, size + radius, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions.abs() % period
    return torch.where(folded > size - 1, period - folded, folded)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding (same as scipy ``gaussian_filter`` in
    ``mode='mirror'`` with ``truncate=4``).

    Args:
        maps: ``(B, H, W)`` float tensor.
        sigma: Standard deviation in pixels; 0 returns the input unchanged.

    Returns:
        ``(B, H, W)`` blurred maps, same dtype and device.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return maps
    radius = math.ceil(4.0 * sigma)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(dtype=maps.dtype, device=maps.device)  # normalised, computed in float64
    _, height, width = maps.shape
    x = maps.unsqueeze(1)                                           # (B, 1, H, W)
    with conv_tf32(maps.device, False):  # cuDNN would otherwise run these float32 convolutions in TF32
        x = x.index_select(3, _reflect_indices(width, radius, maps.device))
        x = F.conv2d(x, kernel.view(1, 1, 1, -1))                  # blur along W
        x = x.index_select(2, _reflect_indices(height, radius, maps.device))
        x = F.conv2d(x, kernel.view(1, 1, -1, 1))                  # blur along H
    return x.squeeze(1)


def anomaly_maps(patch_scores: Tensor, out_size: tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Pixel anomaly maps from patch scores.

    Args:
        patch_scores: ``(B, h, w)`` patch scores (NLL in nats).
        out_size: ``(H, W)`` image size in pixels.
        sigma: Gaussian blur standard deviation in pixels (:func:`gaussian_blur`); 0 disables the blur.

    Returns:
        ``(B, H, W)`` maps, bilinear upsampling (``align_corners=False``) followed by the blur.
    """
    if patch_scores.dim() != 3:
        raise ValueError(f"patch_scores must be (B, h, w), got shape {tuple(patch_scores.shape)}")
    scores = patch_scores if patch_scores.is_floating_point() else patch_scores.float()
    upsampled = F.interpolate(scores.unsqueeze(1), size=tuple(out_size), mode="bilinear",
                              align_corners=False).squeeze(1)
    return gaussian_blur(upsampled, sigma)


def image_scores(patch_scores: Tensor, method: str = "top_k", k: int = 3, percentile: float = 99.0) -> Tensor:
    """Image anomaly scores from the unsmoothed patch scores.

    Args:
        patch_scores: ``(B, h, w)`` patch scores.
        method: ``'top_k'`` (mean of the k largest), ``'max'``, ``'mean'`` or ``'percentile'``
            (linear interpolation, as ``numpy.percentile``).
        k: Number of patches for ``'top_k'``; 1 <= k <= h * w.
        percentile: Percentile in [0, 100] for ``'percentile'``.

    Returns:
        ``(B,)`` image scores.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown image score method {method!r}; valid: {', '.join(SCORE_METHODS)}")
    if patch_scores.dim() != 3:
        raise ValueError(f"patch_scores must be (B, h, w), got shape {tuple(patch_scores.shape)}")
    flat = patch_scores.flatten(1)
    flat = flat if flat.is_floating_point() else flat.float()
    if method == "max":
        return flat.amax(dim=1)
    if method == "mean":
        return flat.mean(dim=1)
    if method == "top_k":
        if not 1 <= k <= flat.shape[1]:
            raise ValueError(f"top_k needs 1 <= k <= {flat.shape[1]} patches, got k={k}")
        return flat.topk(k, dim=1).values.mean(dim=1)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return torch.quantile(flat, percentile / 100.0, dim=1)
