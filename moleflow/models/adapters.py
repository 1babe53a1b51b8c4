"""Input stage of the flow: positional encoding, per-task input adapters, spatial context mixer.

These modules condition the features before the invertible part; the density (and its
log-determinant) is that of the adapted features, as in the reference design.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moleflow.models import experts


def positional_encoding_2d(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2-D sinusoidal encoding (H, W, D) of an H x W grid; D divisible by 4.

    The first D/2 channels encode the column, the last D/2 the row; inside each half channel
    2i = sin(pos * w_i), 2i+1 = cos(pos * w_i), w_i = 10000^(-2i / (D/2)).
    """
    if dim % 4 != 0:
        raise ValueError(f"positional encoding needs D divisible by 4, got {dim}")
    half = dim // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(0, half, 2, dtype=torch.float64) / half)

    def encode(positions: Tensor) -> Tensor:  # (P,) -> (P, half)
        angles = positions[:, None].double() * omega[None, :]
        out = torch.zeros(len(positions), half, dtype=torch.float64)
        out[:, 0::2] = torch.sin(angles)
        out[:, 1::2] = torch.cos(angles)
        return out

    cols = encode(torch.arange(width))[None, :, :].expand(height, width, half)
    rows = encode(torch.arange(height))[:, None, :].expand(height, width, half)
    return torch.cat([cols, rows], dim=-1).float()


class WhiteningAdapter(nn.Module):
    """y = gamma * LN(x) + beta, LN without affine; gamma in (0.5, 2), beta in (-2, 2).

    Args:
        dim: D.
        gamma_raw_init: initial gamma_raw (-0.7 for task 0 gives gamma ~ 1, 0 for later tasks).
    """

    def __init__(self, dim: int, gamma_raw_init: float) -> None:
        super().__init__()
        self.gamma_raw = nn.Parameter(torch.full((dim,), float(gamma_raw_init)))
        self.beta_raw = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.adapt(x, (self.gamma_raw, self.beta_raw))

    @staticmethod
    def adapt(x: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The adapter with picked parameters (``experts.select_params``: (gamma_raw, beta_raw))."""
        gamma_raw, beta_raw = params
        gamma = 0.5 + 1.5 * torch.sigmoid(gamma_raw)
        beta = 2.0 * torch.tanh(beta_raw)
        return experts.channels(gamma, x) * F.layer_norm(x, x.shape[-1:]) + experts.channels(beta, x)


FILM_EPS = 1e-5  # nn.LayerNorm's default


class FiLMAdapter(nn.Module):
    """Fallback adapter (``--no_whitening_adapter``): y = LN_affine(x * (1 + scale) + shift)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim, eps=FILM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.adapt(x, tuple(self.parameters()))

    @staticmethod
    def adapt(x: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The adapter with picked (scale, shift, norm weight, norm bias) (``experts.select_params``)."""
        scale, shift, weight, bias = params
        return experts.layer_norm(x * (1.0 + experts.channels(scale, x)) + experts.channels(shift, x), weight, bias,
                                  FILM_EPS)


class SpatialContextMixer(nn.Module):
    """x' = (1 - g) x + g DWConv_k(x), g = sigmoid(r), r0 = 0.5, conv initialised as a box filter.

    Args:
        dim: D.
        kernel_size: odd k.
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        nn.init.constant_(self.conv.weight, 1.0 / kernel_size**2)
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, D) -> (B, H, W, D)."""
        g = torch.sigmoid(self.gate)
        mixed = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return (1.0 - g) * x + g * mixed
