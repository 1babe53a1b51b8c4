"""Anomaly maps at an input image's own resolution, and heat-map overlays.

The model sees an ``img_size`` square made from the image (``--resize_mode``); its anomaly map is
computed on that square exactly as in the evaluation (``anomaly_map.anomaly_maps``). To give it
back at the image's resolution:

- ``squash``: the square map is resized bilinearly to the image's height and width;
- ``crop``: the model saw only the centre crop (shorter side resized to ``img_size``); the square
  map is resized to the crop's size in the original pixels and placed where the crop lies. The rest
  of the image was not scored: NaN there.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from moleflow.data.dataset import resized_size

NOT_SCORED = float("nan")


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in the original pixels of the centre crop the model sees under
    ``--resize_mode crop`` (the geometry of ``data.dataset.resize_crop``)."""
    resized_w, resized_h = resized_size(width, height, size)
    left = int(round((resized_w - size) / 2.0))
    top = int(round((resized_h - size) / 2.0))
    scale_x, scale_y = width / resized_w, height / resized_h
    box = [int(v + 0.5) for v in (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)]
    return box[0], box[1], max(box[0] + 1, min(width, box[2])), max(box[1] + 1, min(height, box[3]))


def map_to_image(square: Tensor, width: int, height: int, mode: str) -> Tensor:
    """An ``(S, S)`` anomaly map of the model's input -> ``(height, width)`` on the same device
    (module docstring; NaN where the image was not scored)."""
    if mode == "squash":
        return F.interpolate(square[None, None].float(), size=(height, width), mode="bilinear",
                             align_corners=False)[0, 0]
    if mode != "crop":
        raise ValueError(f"resize mode {mode!r} is unknown; valid: crop, squash")
    left, top, right, bottom = crop_box(width, height, square.shape[-1])
    out = torch.full((height, width), NOT_SCORED, dtype=torch.float32, device=square.device)
    out[top:bottom, left:right] = F.interpolate(square[None, None].float(), size=(bottom - top, right - left),
                                                mode="bilinear", align_corners=False)[0, 0]
    return out


def heat_overlay(image: Image.Image, anomaly_map: np.ndarray, low: Optional[float],
                 high: Optional[float]) -> Image.Image:
    """The image with the map drawn over it in the 'jet' colours.

    Colour scale: ``low`` (a typical normal pixel) -> transparent blue, ``high`` (the threshold) and
    above -> red at 60 % opacity; without them the map's own 1st and 99th percentiles. Pixels that
    were not scored (NaN) are shown darkened.

    Args:
        image: the input image (any mode), ``(H, W)`` as the map.
        anomaly_map: ``(H, W)`` float map.
    """
    from matplotlib import colormaps

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    values = np.asarray(anomaly_map, dtype=np.float32)
    scored = np.isfinite(values)
    finite = values[scored]
    if low is None or high is None or not high > low:
        low, high = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99))) if finite.size else (0.0, 1.0)
        high = high if high > low else low + 1.0
    level = np.clip((np.where(scored, values, low) - low) / (high - low), 0.0, 1.0)
    heat = colormaps["jet"](level)[..., :3].astype(np.float32) * 255.0
    alpha = (0.6 * level)[..., None]
    out = rgb * (1.0 - alpha) + heat * alpha
    out[~scored] *= 0.4
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
