"""AnomalyDataset: images and masks decoded at the network's size (``decode.py``: ``'crop'`` or
``'squash'``, SPEC §3 Data), then normalised with the ImageNet mean/std.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from moleflow.data.base import DataError, Sample
from moleflow.data.decode import RESIZE_MODES, decode_sample, read_rgb, read_rgb_resized, resize_crop, resized_size

# read_rgb ... are re-exported: callers import them from here
__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "JITTER", "AnomalyDataset",
           "read_rgb", "read_rgb_resized", "resize_crop", "resized_size"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
JITTER = 0.1  # largest relative brightness / contrast change of the augmentation

class AnomalyDataset(Dataset):
    """Images (and masks) of a list of samples, ready for a frozen ImageNet backbone.

    Each item is a dict with ``image`` FloatTensor ``(3, S, S)`` ImageNet-normalised, ``mask``
    FloatTensor ``(1, S, S)`` in {0, 1} (zeros for good images), ``label`` int and ``index`` int.

    Args:
        samples: The samples, in the order items are served.
        img_size: The side S of the square output.
        augment: Random horizontal flip and small brightness/contrast jitter, drawn from torch's
            global generator (deterministic given ``torch.manual_seed``). Meant for good
            training images; off by default.
        cache: Decode and resize each file once and keep the uint8 result in memory.
        resize_mode: ``'crop'`` or ``'squash'`` (``decode.py``).
    """

    def __init__(self, samples: Sequence[Sample], img_size: int, augment: bool = False,
                 cache: bool = True, resize_mode: str = "crop") -> None:
        if resize_mode not in RESIZE_MODES:
            raise DataError(f"resize mode {resize_mode!r} is unknown; pass --resize_mode as one of "
                            f"{', '.join(RESIZE_MODES)}")
        if img_size < 1:
            raise DataError(f"img_size {img_size} is not positive; pass --img_size >= 32")
        self.samples = list(samples)
        self.img_size = img_size
        self.augment = augment
        self.cache = cache
        self.resize_mode = resize_mode
        self._cached: list[Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]] = [None] * len(self.samples)
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image, mask = self.decoded(index)
        image = image.float().div_(255.0)                       # (3, S, S) in [0, 1]
        mask = (mask.float() if mask is not None
                else torch.zeros(1, self.img_size, self.img_size))  # (1, S, S)
        if self.augment:
            image, mask = self._augment(image, mask)
        image = (image - self._mean) / self._std
        return {"image": image, "mask": mask, "label": int(self.samples[index].label), "index": int(index)}

    def decoded(self, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """uint8 image ``(3, S, S)`` and uint8 {0,1} mask ``(1, S, S)`` (None without mask)."""
        if self.cache and self._cached[index] is not None:
            return self._cached[index]
        sample = self.samples[index]
        pixels, mask = decode_sample(sample.image_path, sample.mask_path, self.img_size, self.resize_mode)
        image_t = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        mask_t = None if mask is None else torch.from_numpy(mask).unsqueeze(0)
        if self.cache:
            self._cached[index] = (image_t, mask_t)
        return image_t, mask_t

    @staticmethod
    def _augment(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip ``(3, S, S)`` / ``(1, S, S)`` together with p = 0.5, jitter brightness and contrast."""
        flip, brightness, contrast = torch.rand(3).tolist()
        if flip < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        grey = image.mean()
        image = (image - grey) * (1.0 + JITTER * (2.0 * contrast - 1.0)) + grey
        image = image * (1.0 + JITTER * (2.0 * brightness - 1.0))
        return image.clamp_(0.0, 1.0), mask
