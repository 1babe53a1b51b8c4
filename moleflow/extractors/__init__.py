"""Frozen backbones that turn images into patch-feature grids ``(B, H', W', D)``.

``build_extractor`` picks the CNN or the ViT extractor by name; :class:`BackboneError` carries
every "this backbone / these weights can't be had" message.
"""

from __future__ import annotations

from typing import Optional, Sequence

from moleflow.extractors.base import FeatureExtractor, ImgSize, channel_pool
from moleflow.extractors.cnn_extractor import DEFAULT_REDUCTIONS, POOLINGS, CNNPatchCoreExtractor
from moleflow.extractors.vit_extractor import ViTPatchCoreExtractor, is_vit_name
from moleflow.extractors.weights import (
    DEFAULT_BACKBONE,
    OFFLINE_BACKBONE,
    BackboneError,
    check_backbone_name,
    efficientnet_lite0_offline_state_dict,
)


def build_extractor(
    backbone_name: str,
    feature_dim: int = 768,
    img_size: ImgSize = 224,
    weights: str = "pretrained",
    weights_path: Optional[str] = None,
    amp: bool = False,
    strides: Sequence[int] = DEFAULT_REDUCTIONS,
    pooling: str = "unfold",
) -> FeatureExtractor:
    """Build the frozen extractor for a timm backbone name.

    ``vit_*``, ``deit_*`` and names containing ``dino`` get :class:`ViTPatchCoreExtractor`; every
    other timm model gets :class:`CNNPatchCoreExtractor` (stride-8 and stride-16 stages).

    Args:
        backbone_name: timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
        feature_dim: ``D``, the width of each patch feature (0: chosen from the backbone's width).
        img_size: Input size, an int or ``(height, width)``.
        weights: ``"pretrained"`` (ImageNet; see :func:`~moleflow.extractors.weights.create_backbone`) or
            ``"random"`` (explicit random init, for tests).
        weights_path: Local ``.pth``/``.pt``/``.safetensors`` state dict; overrides ``weights``.
        amp: On CUDA, bfloat16 autocast (and channels-last for CNNs); output stays float32.
        strides: CNNs: the strides of the stages to use (``--feature_strides``).
        pooling: CNNs: ``'unfold'`` (reference) or ``'avg'`` (``--feature_pooling``; see :mod:`.cnn_extractor`).

    Returns:
        A frozen extractor mapping ``(B, 3, S_h, S_w)`` to ``(B, H', W', D)``.

    Raises:
        BackboneError: Unknown name, missing/unfit weights file, or weights that can't be had.
        ValueError: Invalid ``weights``, ``feature_dim`` or ``img_size``.
    """
    check_backbone_name(backbone_name)
    if is_vit_name(backbone_name):
        if tuple(strides) != DEFAULT_REDUCTIONS or pooling != "unfold":
            raise BackboneError(f"{backbone_name} is a ViT: --feature_strides and --feature_pooling apply to "
                                "CNNs only; drop them")
        return ViTPatchCoreExtractor(backbone_name, feature_dim=feature_dim, img_size=img_size, weights=weights,
                                     weights_path=weights_path, amp=amp)
    return CNNPatchCoreExtractor(backbone_name, feature_dim=feature_dim, img_size=img_size, weights=weights,
                                 weights_path=weights_path, amp=amp, reductions=tuple(strides), pooling=pooling)


__all__ = [
    "BackboneError", "CNNPatchCoreExtractor", "DEFAULT_REDUCTIONS", "POOLINGS", "DEFAULT_BACKBONE", "FeatureExtractor",
    "OFFLINE_BACKBONE", "ViTPatchCoreExtractor", "build_extractor", "channel_pool",
    "efficientnet_lite0_offline_state_dict",
]
