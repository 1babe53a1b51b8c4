"""Patch features from a frozen timm Vision Transformer (ViT, DeiT, DINO, DINOv2).

The patch tokens of blocks 1, 3, 5, 11 (clipped to the depth) come from timm's ``forward_intermediates``
without the prefix tokens (CLS, registers, distillation); each block's tokens are channel-pooled to ``D``,
the blocks averaged and the tokens laid out on the (possibly non-square) patch grid.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from moleflow.extractors.base import FeatureExtractor, ImgSize, auto_feature_dim, channel_pool
from moleflow.extractors.weights import BackboneError, arch_name, create_backbone

DEFAULT_BLOCKS = (1, 3, 5, 11)


def is_vit_name(backbone_name: str) -> bool:
    """Whether a timm name is handled by :class:`ViTPatchCoreExtractor` (vit_*, deit_*, *dino*)."""
    arch = arch_name(backbone_name).lower()
    return arch.startswith(("vit_", "deit_")) or "dino" in backbone_name.lower()


def clip_blocks(blocks: Sequence[int], depth: int) -> list[int]:
    """0-based ``blocks`` clipped to ``[0, depth)``, sorted, without duplicates (``[1, 3, 5, 11]``, 4 -> ``[1, 3]``)."""
    if not blocks:
        raise ValueError("blocks must name at least one block")
    return sorted({min(max(int(b), 0), depth - 1) for b in blocks})


class ViTPatchCoreExtractor(FeatureExtractor):
    """Frozen timm ViT -> ``(B, H', W', D)`` patch-token features.

    Args:
        backbone_name: timm ViT name, e.g. ``vit_base_patch16_224``, ``deit_small_patch16_224``,
            ``vit_small_patch14_dinov2``.
        feature_dim: ``D``; 0 = :func:`auto_feature_dim` of the token width.
        img_size: An int or ``(height, width)``; positional embeddings are made (pretrained ones resampled) for it.
        weights, weights_path, amp: as for :func:`~moleflow.extractors.build_extractor`.
    """

    def __init__(
        self,
        backbone_name: str,
        feature_dim: int = 768,
        img_size: ImgSize = 224,
        weights: str = "pretrained",
        weights_path: Optional[str] = None,
        amp: bool = False,
    ) -> None:
        super().__init__(feature_dim, img_size, amp)
        self.backbone_name = backbone_name
        self.backbone = create_backbone(backbone_name, weights, weights_path, img_size=self.img_size, num_classes=0)
        if not hasattr(self.backbone, "forward_intermediates") or not hasattr(self.backbone, "patch_embed"):
            raise BackboneError(f"{backbone_name}: this timm model offers no forward_intermediates/patch_embed; "
                                "use a vit_*/deit_* model or a CNN")
        self.blocks = clip_blocks(DEFAULT_BLOCKS, len(self.backbone.blocks))
        self.embed_dim = int(self.backbone.embed_dim)
        if self.feature_dim == 0:
            self.feature_dim = auto_feature_dim(self.embed_dim)
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 1))
        grid = self.backbone.patch_embed.grid_size
        self._grid = (int(grid[0]), int(grid[1]))
        self._freeze()

    def layer_dims(self) -> list[int]:
        """The token width per used block."""
        return [self.embed_dim] * len(self.blocks)

    def _extract(self, images: Tensor) -> Tensor:
        """``(B, 3, S_h, S_w)`` -> ``(B, H', W', D)``."""
        tokens = self.backbone.forward_intermediates(
            images, indices=self.blocks, intermediates_only=True, output_fmt="NLC", norm=False
        )  # list of (B, H'*W', E), prefix tokens already removed by timm
        h, w = self._grid
        out: Optional[Tensor] = None
        for tok in tokens:
            if tok.shape[1] != h * w:
                raise BackboneError(f"{self.backbone_name}: block output has {tok.shape[1]} tokens, expected {h}x{w} "
                                    "patch tokens (prefix tokens not removed by this timm version)")
            pooled = channel_pool(tok.float(), self.feature_dim)
            out = pooled if out is None else out + pooled
        assert out is not None, "no blocks"
        return (out / len(tokens)).reshape(images.shape[0], h, w, self.feature_dim)


__all__ = ["ViTPatchCoreExtractor", "is_vit_name", "clip_blocks", "DEFAULT_BLOCKS"]
