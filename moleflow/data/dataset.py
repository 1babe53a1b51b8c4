"""AnomalyDataset: decoded, resized, centre-cropped and normalised images with their masks.

Transform (SPEC §3 Data), by ``resize_mode``: ``'crop'`` resizes the shorter side to ``img_size``
(bilinear) and centre-crops ``img_size x img_size``; ``'squash'`` resizes the whole image to
``img_size x img_size`` (the aspect ratio changes, nothing is dropped). Then ImageNet mean/std.
Masks get the same resize with nearest-neighbour sampling and the same crop; any non-zero mask
pixel is anomalous. For square images both modes give the same pixels.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from moleflow.data.base import DataError, Sample, one_line

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
JITTER = 0.1  # largest relative brightness / contrast change of the augmentation
RESIZE_MODES: tuple[str, ...] = ("crop", "squash")


@contextlib.contextmanager
def _opened_rgb(path: Path) -> Iterator[Image.Image]:
    """The decoded file as 8-bit RGB, valid inside the block (closing the file frees it).

    Raises:
        DataError: The file cannot be read or decoded.
    """
    try:
        with Image.open(path) as image:
            image.load()
            yield image if image.mode == "RGB" else _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {one_line(error)}; replace or remove the file") from error


def read_rgb(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB (grey, 16-bit, palette, RGBA and 1-bit inputs included).

    Raises:
        DataError: The file cannot be read or decoded.
    """
    with _opened_rgb(path) as rgb:
        return rgb.copy()


def read_rgb_resized(path: Path, size: int, mode: str = "crop") -> tuple[Image.Image, tuple[int, int]]:
    """``read_rgb`` followed by ``resize_crop(..., size, BILINEAR, mode=mode)``, the same pixels,
    resized from the decoded data before the file closes (no full-size copy).

    Returns:
        (the ``size x size`` RGB image, the decoded image's (width, height)).

    Raises:
        DataError: The file cannot be read or decoded.
    """
    with _opened_rgb(path) as rgb:
        return resize_crop(rgb, size, Image.Resampling.BILINEAR, mode=mode), rgb.size


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask as a boolean array ``(H, W)``: True wherever any colour channel is non-zero.

    Raises:
        DataError: The file cannot be read or decoded.
    """
    try:
        with Image.open(path) as image:
            image.load()
            values = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read mask {path}: {one_line(error)}; replace or remove the file") from error
    if values.ndim == 3:
        if values.shape[2] in (2, 4):  # LA / RGBA: the alpha channel is not the mask
            values = values[..., :-1]
        return values.any(axis=2)
    return values != 0


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shorter side to ``size`` (longer side truncated)."""
    if width <= height:
        return size, max(size, int(size * height / width))
    return max(size, int(size * width / height)), size


def resize_crop(image: Image.Image, size: int, resample: Image.Resampling,
                target: Optional[tuple[int, int]] = None, mode: str = "crop") -> Image.Image:
    """``mode='crop'``: resize so the shorter side is ``size`` (or to ``target`` = (W, H)), then
    centre-crop ``size``; ``mode='squash'``: resize the whole image to ``size x size``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is unknown; valid: {', '.join(RESIZE_MODES)}")
    if mode == "squash":
        return image.resize((size, size), resample)
    width, height = target or resized_size(*image.size, size)
    image = image.resize((width, height), resample)
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


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
        resize_mode: ``'crop'`` or ``'squash'`` (module docstring).
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

    @property
    def labels(self) -> list[int]:
        """Image labels (0 good, 1 defect) in item order."""
        return [s.label for s in self.samples]

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
        image, full_size = read_rgb_resized(sample.image_path, self.img_size, self.resize_mode)
        image_t = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        mask_t = None
        if sample.mask_path is not None:
            mask = Image.fromarray(read_mask(sample.mask_path).astype(np.uint8) * 255)
            target = resized_size(*full_size, self.img_size)
            mask = resize_crop(mask, self.img_size, Image.Resampling.NEAREST, target=target,
                               mode=self.resize_mode)
            mask_t = torch.from_numpy(np.array(mask) > 0).to(torch.uint8).unsqueeze(0)
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; 16-bit and float images are scaled into 0..255."""
    if image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(values.round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        values = values * (255.0 / peak) if peak > 255.0 else values
        image = Image.fromarray(values.clip(0, 255).round().astype(np.uint8))
    elif image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")
