"""Image and mask files -> uint8 arrays at the network's size: the decoding and resizing of
``AnomalyDataset`` (SPEC §3 Data), kept free of torch so decoding worker processes start quickly
(``moleflow.extractors.decoding``). Images are resized bilinearly (``resize_crop``: ``'crop'`` or
``'squash'``), masks the same way with nearest-neighbour sampling; any non-zero mask pixel is
anomalous. The readers raise ``DataError`` when a file cannot be read or decoded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from moleflow.data.base import DataError, one_line

RESIZE_MODES: tuple[str, ...] = ("crop", "squash")


@contextlib.contextmanager
def _opened(path: Path, kind: str) -> Iterator[Image.Image]:
    """The decoded file, valid inside the block (closing the file frees it); DataError when unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            yield image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read {kind} {path}: {one_line(error)}; replace or remove the file") from error


def read_rgb(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB (grey, 16-bit, palette, RGBA and 1-bit inputs included)."""
    with _opened(path, "image") as image:
        return _to_rgb(image).copy()


def read_rgb_resized(path: Path, size: int, mode: str = "crop") -> tuple[Image.Image, tuple[int, int]]:
    """``read_rgb`` then ``resize_crop(..., size, BILINEAR, mode=mode)`` (the same pixels, without a
    full-size copy): (the ``size x size`` RGB image, the decoded image's (width, height))."""
    with _opened(path, "image") as image:
        return resize_crop(_to_rgb(image), size, Image.Resampling.BILINEAR, mode=mode), image.size


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask as a boolean array ``(H, W)``: True wherever any colour channel is non-zero."""
    with _opened(path, "mask") as image:
        values = np.asarray(image)
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


def decode_sample(image_path: Path, mask_path: Optional[Path], size: int,
                  mode: str = "crop") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """One sample at the network's size: uint8 RGB ``(size, size, 3)`` and uint8 {0, 1} mask
    ``(size, size)`` (None without a mask file)."""
    image, full_size = read_rgb_resized(image_path, size, mode)
    pixels = np.array(image, dtype=np.uint8)
    if mask_path is None:
        return pixels, None
    mask = Image.fromarray(read_mask(mask_path).astype(np.uint8) * 255)
    mask = resize_crop(mask, size, Image.Resampling.NEAREST, target=resized_size(*full_size, size), mode=mode)
    return pixels, (np.array(mask) > 0).astype(np.uint8)


def decode_chunk(files: list[tuple[str, Optional[str]]], size: int,
                 mode: str) -> tuple[np.ndarray, list[Optional[np.ndarray]]]:
    """``decode_sample`` of ``(image, mask or None)`` files: uint8 images ``(n, size, size, 3)`` and
    each mask ``(size, size)`` or None (the job of a decoding worker process)."""
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    masks: list[Optional[np.ndarray]] = []
    for i, (image, mask) in enumerate(files):
        images[i], decoded_mask = decode_sample(Path(image), Path(mask) if mask else None, size, mode)
        masks.append(decoded_mask)
    return images, masks


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (an RGB image itself); 16-bit and float images are scaled into 0..255."""
    if image.mode == "RGB":
        return image
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
