"""PatchCore-style patch features from a frozen timm CNN (by default its stride-8 and stride-16 stages).

Two ways to turn the stage maps into one ``D``-wide vector per position of the stride-8 grid
(``pooling``):

- ``'unfold'`` (the reference): per stage, a 3x3 neighbourhood around each position (``F.unfold``,
  zero padding 1, so C*9 values per position in channel-major order), reduced to ``D`` by
  :func:`channel_pool`; each stage map is resized bilinearly to the grid; the stages are averaged.
  Channel pooling and bilinear resizing are both linear (one over channels, one over space), so
  pooling first and resizing the ``D``-wide map equals resizing the C*9-wide patches first (the
  PatchCore order) at a fraction of the memory; a test checks the equality.
- ``'avg'``: per stage, the mean of each channel over the 3x3 neighbourhood (zero padding 1), each
  stage map resized bilinearly to the grid, the stages *concatenated* (sum of C channels) and the
  result pooled to ``D`` by :func:`channel_pool`. Stages keep their own channels instead of being
  summed into the same ones.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from moleflow.extractors.base import FeatureExtractor, ImgSize, auto_feature_dim, channel_pool
from moleflow.extractors.weights import BackboneError, create_backbone
from moleflow.utils.precision import conv_tf32

DEFAULT_REDUCTIONS = (8, 16)
GRID_REDUCTION = 8  # the patch grid is the stride-8 one whenever a stride-8 stage is used
POOLINGS: tuple[str, ...] = ("unfold", "avg")


def _probe(backbone_name: str, img_hw: tuple[int, int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """``(reductions, channels, sizes)`` of every ``features_only`` stage at ``img_hw``, asked of timm on the
    meta device (no memory, no weights), else by a CPU dummy forward."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(backbone_name, features_only=True, pretrained=False)
            outs = probe(torch.empty(1, 3, *img_hw))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: pay for a real forward
        probe = timm.create_model(backbone_name, features_only=True, pretrained=False).eval()
        with torch.no_grad():
            outs = probe(torch.zeros(1, 3, *img_hw))
    sizes = [(int(o.shape[-2]), int(o.shape[-1])) for o in outs]
    return list(probe.feature_info.reduction()), list(probe.feature_info.channels()), sizes


def select_stages(reductions: Sequence[int], wanted: Sequence[int] = DEFAULT_REDUCTIONS) -> list[int]:
    """The deepest stage for each ``wanted`` reduction, as ``out_indices`` in the order of ``wanted``.

    Args:
        reductions: Reduction (stride) of each stage, as ``feature_info.reduction()`` gives.
        wanted: Reductions to use, e.g. ``(8, 16)``.

    Raises:
        BackboneError: A wanted reduction is not offered.
    """
    picked = []
    for r in wanted:
        hits = [i for i, red in enumerate(reductions) if red == r]
        if not hits:
            raise BackboneError(f"the backbone has no stage with stride {r} (its strides: {list(reductions)}); "
                                f"pass --feature_strides with strides it has, or choose another CNN")
        picked.append(hits[-1])
    return picked


class CNNPatchCoreExtractor(FeatureExtractor):
    """Frozen timm CNN -> ``(B, H', W', D)`` locally aware patch features.

    Args:
        backbone_name: timm CNN name, e.g. ``wide_resnet50_2``, ``resnet18``, ``efficientnet_lite0``.
        feature_dim: ``D``; 0 = :func:`auto_feature_dim` of the pooled width (``'avg'``: the summed
            channels; ``'unfold'``: the widest stage's C*9).
        reductions: Strides of the stages to use (each the deepest stage with that stride).
        pooling: ``'unfold'`` or ``'avg'`` (module docstring).
        img_size, weights, weights_path, amp: as for :func:`~moleflow.extractors.build_extractor`.
    """

    def __init__(
        self,
        backbone_name: str,
        feature_dim: int = 768,
        img_size: ImgSize = 224,
        weights: str = "pretrained",
        weights_path: Optional[str] = None,
        amp: bool = False,
        reductions: Sequence[int] = DEFAULT_REDUCTIONS,
        pooling: str = "unfold",
    ) -> None:
        super().__init__(feature_dim, img_size, amp)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is unknown; valid: {', '.join(POOLINGS)}")
        self.backbone_name = backbone_name
        self.pooling = pooling
        all_reductions, channels, sizes = _probe(backbone_name, self.img_size)
        indices = select_stages(all_reductions, reductions)
        self.backbone = create_backbone(backbone_name, weights, weights_path, features_only=True,
                                        out_indices=tuple(indices))
        self.channels = [int(c) for c in self.backbone.feature_info.channels()]
        self.reductions = [int(r) for r in self.backbone.feature_info.reduction()]
        expected = [channels[i] for i in indices]
        if self.channels != expected:
            raise BackboneError(f"{backbone_name}: stage channels {self.channels} differ from the probe {expected}")
        if self.feature_dim == 0:
            self.feature_dim = auto_feature_dim(max(self.layer_dims()))
        self._stage_sizes = [sizes[i] for i in indices]
        on_grid = [sizes[i] for i in indices if all_reductions[i] == GRID_REDUCTION]
        self._grid = on_grid[0] if on_grid else max(self._stage_sizes, key=lambda hw: hw[0] * hw[1])
        self.store_maps: Optional[bool] = None
        self._channels_last = False
        self._freeze()

    def layer_dims(self) -> list[int]:
        """The width pooled to ``D``: C*9 per used stage (``'unfold'``), or the summed channels of
        the used stages, one entry (``'avg'``)."""
        if self.pooling == "avg":
            return [sum(self.channels)]
        return [c * 9 for c in self.channels]

    def keeps_maps(self, device: torch.device) -> bool:
        """The cache keeps the stage maps when they are bfloat16 (``amp`` on CUDA): half the bytes of
        the float32 features (``store_maps`` True/False forces the choice)."""
        return self.store_maps if self.store_maps is not None else self.amp and device.type == "cuda"

    def stored_row(self, device: torch.device) -> tuple[tuple[int, ...], torch.dtype]:
        if not self.keeps_maps(device):
            return super().stored_row(device)
        width = sum(h * w * c for (h, w), c in zip(self._stage_sizes, self.channels))
        return (width,), torch.bfloat16 if self.amp and device.type == "cuda" else torch.float32

    def _stage_maps(self, images: Tensor) -> list[Tensor]:
        if self.amp and images.is_cuda:
            if not self._channels_last:
                with torch.inference_mode(False):  # parameters must stay ordinary tensors
                    self.backbone.to(memory_format=torch.channels_last)
                self._channels_last = True
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def _extract(self, images: Tensor) -> Tensor:
        """``(B, 3, S_h, S_w)`` -> ``(B, H', W', D)``; see the module docstring."""
        return self._pool_maps(self._stage_maps(images))

    def _maps_rows(self, images: Tensor) -> Tensor:
        """The stage maps channels-last (``(h, w, C)`` each), one flat row per image."""
        dtype = self.stored_row(images.device)[1]
        maps = [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1) for m in self._stage_maps(images)]
        return torch.cat(maps, dim=1).to(dtype)

    def _pool_rows(self, rows: Tensor) -> Tensor:
        maps, at = [], 0
        for (h, w), c in zip(self._stage_sizes, self.channels):
            maps.append(rows[:, at:at + h * w * c].view(-1, h, w, c).permute(0, 3, 1, 2))
            at += h * w * c
        return self._pool_maps(maps)

    def _pool_maps(self, maps: Sequence[Tensor]) -> Tensor:
        if self.pooling == "avg":
            return self.aggregate_avg(maps, self._grid, self.feature_dim)
        return self.aggregate(maps, self._grid, self.feature_dim)

    @staticmethod
    def aggregate_avg(maps: Sequence[Tensor], grid: tuple[int, int], feature_dim: int) -> Tensor:
        """``'avg'``: stage maps ``(B, C_l, h_l, w_l)`` -> 3x3 channel means, resized to ``grid`` ``(H', W')``,
        concatenated, pooled to ``(B, H', W', D)`` float32."""
        stages = []
        for fmap in maps:
            fmap = F.avg_pool2d(fmap.float(), kernel_size=3, stride=1, padding=1)
            if tuple(fmap.shape[-2:]) != tuple(grid):
                fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
            stages.append(fmap)
        joined = torch.cat(stages, dim=1).permute(0, 2, 3, 1)        # (B, H', W', sum C)
        return channel_pool(joined, feature_dim).contiguous()

    @staticmethod
    def aggregate(maps: Sequence[Tensor], grid: tuple[int, int], feature_dim: int) -> Tensor:
        """``'unfold'``: stage maps ``(B, C_l, h_l, w_l)`` -> 3x3 neighbourhoods pooled to ``D``, resized to
        ``grid`` ``(H', W')`` and averaged: ``(B, H', W', D)`` float32."""
        out: Optional[Tensor] = None
        for fmap in maps:
            from_bf16 = fmap.dtype == torch.bfloat16
            fmap = fmap.float()
            b, c, h, w = fmap.shape
            pooled = _pool_windows(fmap, feature_dim, from_bf16)  # the same windows, without the 9x tensor
            if pooled is None:
                patches = F.unfold(fmap, kernel_size=3, padding=1)  # (B, C*9, h*w), channel-major
                pooled = channel_pool(patches.transpose(1, 2), feature_dim)  # (B, h*w, D)
                pooled = pooled.transpose(1, 2).reshape(b, feature_dim, h, w)
            if (h, w) != tuple(grid):
                pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
            out = pooled if out is None else out + pooled
        assert out is not None, "no feature maps"
        return (out / len(maps)).permute(0, 2, 3, 1).contiguous()


def _window_layout(channels: int, feature_dim: int) -> Optional[tuple[int, int, int]]:
    """(k, g, windows per group) of the unfold + channel-pool step when it is a grouped convolution
    (see ``window_weights``), else None."""
    width = 9 * channels
    if width % feature_dim:
        return None
    k = width // feature_dim
    group = k // math.gcd(9, k)
    if channels % group:
        return None
    return k, group, 9 * group // k


@functools.lru_cache(maxsize=16)
def window_weights(channels: int, feature_dim: int, device: torch.device, merge: int = 1,
                   value: Optional[float] = None) -> Optional[Tensor]:
    """The 3x3-unfold + channel-pool step as grouped-convolution weights, when it is one.

    Unfolding gives, per position, the vector ``x[c, ky, kx]`` at index ``9c + 3ky + kx``; pooling
    to ``D`` averages windows of ``k = 9C / D`` consecutive entries when ``D`` divides ``9C``. Then
    every ``g = k / gcd(9, k)`` channels hold exactly ``9g / k`` whole windows, so output ``d`` is a
    fixed 3x3 filter (weights ``1/k`` on its window's entries) over one group of ``g`` channels.

    Args:
        merge: put ``merge`` such groups in one convolution group (block-diagonal weights, zeros
            between blocks): larger groups run on tensor cores.
        value: the weight of a window entry (default ``1/k``; 1.0 gives window sums).

    Returns:
        ``(D, g * merge, 3, 3)`` weights for ``conv2d(groups=C / (g * merge), padding=1)``, or None
        when ``D`` does not divide ``9C`` (or ``g * merge`` does not divide ``C``).
    """
    layout = _window_layout(channels, feature_dim)
    if layout is None or channels % (layout[1] * merge):
        return None
    k, group, per_group = layout
    weight = torch.zeros(feature_dim, group * merge, 9, dtype=torch.float64)
    for d in range(feature_dim):
        block = (d // per_group) % merge  # which of the merged groups the window lies in
        first = (d % per_group) * k  # the window's first entry inside its group
        for entry in range(first, first + k):
            weight[d, block * group + entry // 9, entry % 9] = 1.0 / k if value is None else value
    return weight.view(feature_dim, group * merge, 3, 3).to(device=device, dtype=torch.float32)


def _pool_windows(fmap: Tensor, feature_dim: int, from_bf16: bool) -> Optional[Tensor]:
    """The unfold + channel-pool step as a convolution, or None when it is not one.

    On CUDA, maps computed in bfloat16 (``amp``) are pooled as window *sums* with TF32 tensor-core
    convolutions over merged groups of >= 32 channels, then divided by ``k``: a bfloat16 value and a
    weight of 1 are exact in TF32 and the sums accumulate in float32, so this is the float32 result
    up to the order of the additions, without cuDNN's slow kernel for 2- or 4-channel groups.
    Otherwise the ``1/k`` weights run as an exact float32 grouped convolution.
    """
    channels = fmap.shape[1]
    layout = _window_layout(channels, feature_dim)
    if layout is None:
        return None
    k, group, _ = layout
    sums = from_bf16 and fmap.is_cuda
    merge = 1
    while sums and group * merge < 32 and channels % (group * merge * 2) == 0:
        merge *= 2
    weight = window_weights(channels, feature_dim, fmap.device, merge, 1.0 if sums else None)
    with torch.autocast(fmap.device.type, enabled=False), conv_tf32(fmap.device, sums):
        pooled = F.conv2d(fmap, weight, padding=1, groups=channels // weight.shape[1])
    return pooled / k if sums else pooled


__all__ = ["CNNPatchCoreExtractor", "select_stages", "window_weights"]
