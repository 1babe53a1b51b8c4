"""The frozen feature-extractor base class and the parameter-free channel pooling.

Every extractor maps ImageNet-normalised images ``(B, 3, S_h, S_w)`` to a patch-feature grid
``(B, H', W', D)``. Widths differ between backbones (C*9 per CNN layer, the token width for a ViT);
they are brought to ``D`` by :func:`channel_pool`, an adaptive average pooling over the channel
axis with no parameters, so no randomly initialised projection ever enters the features.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ImgSize = Union[int, tuple[int, int]]
AUTO_FEATURE_DIM_MAX = 768  # D of the main configuration; ``feature_dim = 0`` never goes above it
POOL_CHUNK = 64  # images per pooling call when stored stage maps become features


def auto_feature_dim(width: int) -> int:
    """``D`` for ``feature_dim = 0``: ``width`` (what would be pooled to ``D``) rounded down to a multiple
    of 4 (the 2-D positional encoding needs it), at most :data:`AUTO_FEATURE_DIM_MAX`, so pooling never
    repeats channels."""
    return max(4, min(AUTO_FEATURE_DIM_MAX, width - width % 4))


def as_hw(img_size: ImgSize) -> tuple[int, int]:
    """One int (square) or a ``(height, width)`` pair -> ``(height, width)``; ValueError unless positive ints."""
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(f"img_size must be a positive int or (height, width), got {img_size!r}")
    return int(hw[0]), int(hw[1])


def by_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """``fn`` over the rows of ``x`` in chunks of exactly ``size`` (the last padded with zeros), the
    results concatenated: the kernels see one shape (cuDNN and oneDNN pick theirs by shape) and no row
    reads another, so a row's result never depends on the rows beside it."""
    out = []
    for start in range(0, max(1, x.shape[0]), size):
        chunk = x[start:start + size]
        n = chunk.shape[0]
        if n < size:
            chunk = torch.cat([chunk, chunk.new_zeros(size - n, *chunk.shape[1:])])
        out.append(fn(chunk)[:n])
    return torch.cat(out)


def channel_pool(x: Tensor, out_dim: int) -> Tensor:
    """Reduce the last axis to ``out_dim`` by adaptive average pooling (no parameters): output channel
    ``i`` is the mean of input channels ``[floor(i*C/D), ceil((i+1)*C/D))`` (repeated when ``D > C``).

    Args:
        x: ``(..., C)`` features.
        out_dim: ``D``, the output width.

    Returns:
        ``(..., D)`` pooled features, same dtype as ``x``.
    """
    lead = x.shape[:-1]
    pooled = F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), out_dim)
    return pooled.reshape(*lead, out_dim)


class FeatureExtractor(nn.Module):
    """Base class of the frozen extractors: always in eval mode, no parameter requires grad.

    Subclasses set ``self.backbone`` and ``self._grid`` and implement :meth:`_extract`.

    Attributes:
        feature_dim: ``D``, the width of every patch feature (``0`` at construction: chosen by the
            subclass with :func:`auto_feature_dim` once it knows its width).
        img_size: ``(height, width)`` of the images :meth:`forward` accepts.
        amp: On CUDA, run the backbone in bfloat16 autocast (and channels-last for CNNs).
    """

    feature_dim: int

    def __init__(self, feature_dim: int, img_size: ImgSize, amp: bool = False) -> None:
        super().__init__()
        if not isinstance(feature_dim, int) or feature_dim < 0:
            raise ValueError(f"feature_dim must be a positive int or 0 (auto), got {feature_dim!r}")
        self.feature_dim = feature_dim
        self.img_size = as_hw(img_size)
        self.amp = bool(amp)
        self._grid: tuple[int, int] = (0, 0)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stay in eval mode whatever ``mode`` a parent's ``.train()`` asks (BN statistics stay frozen)."""
        return super().train(False)

    def grid_size(self) -> tuple[int, int]:
        """Return ``(H', W')``, the patch grid for ``img_size``."""
        return self._grid

    def layer_dims(self) -> list[int]:
        """The width pooled to ``D`` per used layer (a caller warns when ``D`` exceeds one: channels repeat)."""
        raise NotImplementedError

    def _extract(self, images: Tensor) -> Tensor:
        """Compute ``(B, H', W', D)`` features; called under inference mode."""
        raise NotImplementedError

    def keeps_maps(self, device: torch.device) -> bool:
        """Whether :meth:`stored` gives the backbone's stage maps rather than the features on ``device``
        (a subclass whose maps are smaller than its features says so)."""
        return False

    def stored_row(self, device: torch.device) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one image's :meth:`stored` row on ``device``: the features
        ``(H', W', D)`` float32, unless :meth:`keeps_maps`."""
        return (*self._grid, self.feature_dim), torch.float32

    def _maps_rows(self, images: Tensor) -> Tensor:
        """``(B, ...)`` stage maps, flattened per image (a subclass that :meth:`keeps_maps`)."""
        raise NotImplementedError

    def _pool_rows(self, rows: Tensor) -> Tensor:
        """Rows of :meth:`_maps_rows` -> ``(B, H', W', D)`` float32 (a subclass that :meth:`keeps_maps`)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _autocast(self, images: Tensor) -> Iterator[None]:
        """bfloat16 autocast on CUDA when ``amp`` is set; a no-op otherwise."""
        if self.amp and images.is_cuda:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, S_h, S_w)`` ImageNet-normalised images (``img_size``; else ValueError) -> ``(B, H', W', D)``
        float32 features without grad history: ``from_stored(stored(images))``."""
        return self.from_stored(self.stored(images))

    def stored(self, images: Tensor) -> Tensor:
        """What the feature cache keeps of ``images``: one row per image, shaped and typed as
        :meth:`stored_row` says (the features, or the stage maps when :meth:`keeps_maps`)."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"expected images of shape (B, 3, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got {tuple(images.shape)}")
        with torch.inference_mode(), self._autocast(images):
            rows = self._maps_rows(images) if self.keeps_maps(images.device) else self._extract(images).float()
        # clone outside inference mode -> a normal tensor that autograd may save for backward
        return rows.clone()

    @torch.no_grad()
    def from_stored(self, rows: Tensor) -> Tensor:
        """The features of :meth:`stored` rows. Stage maps are pooled :func:`by_chunks` of
        ``POOL_CHUNK`` images, so an image's features never depend on which images were pooled beside it."""
        if not self.keeps_maps(rows.device):
            return rows
        return by_chunks(self._pool_rows, rows, POOL_CHUNK)
