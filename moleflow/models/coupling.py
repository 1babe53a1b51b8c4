"""Invertible blocks of the flow: one affine-coupling base, the shared MoLE blocks and the DIA blocks.

``AffineCoupling`` does the arithmetic once, in both directions: split x into (x1, x2), take (a_s, t)
from the subclass's ``coefficients(x1, ...)``, soft-clamp s = c * tanh(a_s), y2 = x2 * exp(s) + t
(reverse: x2 = (y2 - t) * exp(-s)), join [x1, y2]; log|det J| per row = sum(s) (reverse: -sum(s)).
Subclasses write only their coefficients and any fixed channel arrangement.

Why not FrEIA's modules: the loss and the anomaly score need the log-determinant *per patch*, but
FrEIA's couplings sum it over all non-batch axes; the MoLE subnet also needs the patch grid
(depthwise scale-context conv) and the picked LoRA expert, which FrEIA's ``subnet(x)`` call cannot
carry. The DIA blocks compute exactly FrEIA's ``AffineCouplingOneSided`` with clamp activation
TANH (tested bit for bit). The fixed permutation is ours because FrEIA's ``PermuteRandom`` reseeds
numpy's global RNG as a side effect.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moleflow.models import experts
from moleflow.models.experts import Expert
from moleflow.models.fusion import fusable
from moleflow.models.kernels import permute_last_dim
from moleflow.models.lora import MoLESubnet


class AffineCoupling(nn.Module):
    """y = [x1, x2 * exp(s) + t], log|det J| = sum(s) per row; s = clamp * tanh(a_s).

    Args:
        split: width of x1 (the conditioning half).
        clamp: soft clamp c of the log-scale.
    """

    def __init__(self, split: int, clamp: float) -> None:
        super().__init__()
        self.split = split
        self.clamp = clamp

    def coefficients(self, x1: Tensor, *args: object) -> tuple[Tensor, Tensor]:
        """(a_s, t) for x2, each (..., width of x2), from the conditioning half x1."""
        raise NotImplementedError

    def couple(self, x: Tensor, *args: object, rev: bool = False) -> tuple[Tensor, Tensor]:
        """x (..., D) -> (y (..., D), log|det J| (...)) of the direction run; ``args`` go to ``coefficients``."""
        x1, x2 = x[..., :self.split], x[..., self.split:]
        a_s, t = self.coefficients(x1, *args)
        s = self.clamp * torch.tanh(a_s)
        if rev:
            return torch.cat([x1, (x2 - t) * torch.exp(-s)], dim=-1), -s.sum(dim=-1)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=-1), s.sum(dim=-1)


class MoLECouplingBlock(AffineCoupling):
    """Shared coupling (AllInOneBlock style) whose subnet carries the LoRA experts, then a fixed seeded
    channel permutation: (a_s, t) = 0.1 * subnet(x1, expert); y = permute(coupling(x)).

    Args:
        dim: D, the patch-feature width.
        rank: LoRA rank (0 = no LoRA experts).
        alpha: LoRA alpha.
        clamp: soft clamp c of the log-scale.
        scale_context_kernel: depthwise kernel of the scale branch (0 = off).
        permutation_seed: seed of this block's permutation.
    """

    def __init__(self, dim: int, rank: int, alpha: float, clamp: float,
                 scale_context_kernel: int, permutation_seed: int) -> None:
        super().__init__(dim // 2, clamp)
        self.subnet = MoLESubnet(dim // 2, dim - dim // 2, rank, alpha, scale_context_kernel)
        perm = torch.randperm(dim, generator=torch.Generator().manual_seed(permutation_seed))
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def coefficients(self, x1: Tensor, picked: Sequence[Optional[Expert]]) -> tuple[Tensor, Tensor]:
        s_logits, t_logits = self.subnet(x1, picked)
        return 0.1 * s_logits, 0.1 * t_logits

    def forward(self, x: Tensor, picked: Sequence[Optional[Expert]], rev: bool = False) -> tuple[Tensor, Tensor]:
        """Args: x (B, H, W, D); picked: ``subnet.experts(task)``. Returns (y (B, H, W, D), log|det J|
        (B, H, W)) of the direction run."""
        if rev:
            return self.couple(permute_last_dim(x, self.perm_inv, self.perm), picked, rev=True)
        y, log_det = self.couple(x, picked)
        return permute_last_dim(y, self.perm, self.perm_inv), log_det


class DIASubnet(nn.Module):
    """One task's weights of a DIA block: separate s and t MLPs (in -> h -> h -> out each, ReLU), last
    layers zero-initialised so the block starts as the identity. ``run`` applies picked weights."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int) -> None:
        super().__init__()
        self.s_net = self._mlp(dim_in, hidden, dim_out)
        self.t_net = self._mlp(dim_in, hidden, dim_out)

    @staticmethod
    def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
        last = nn.Linear(hidden, dim_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), last)

    @staticmethod
    def run(x: Tensor, weights: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(s_raw, t_raw) of x with ``experts.select_params`` of the subnets: the s net's three
        (weight, bias) pairs, then the t net's."""

        def mlp(layers: Sequence[Tensor]) -> Tensor:
            h = x
            for i in range(3):
                h = experts.linear(h, layers[2 * i], layers[2 * i + 1])
                h = F.relu(h) if i < 2 else h
            return h

        return mlp(weights[:6]), mlp(weights[6:])


class DIABlock(AffineCoupling):
    """A task-owned affine coupling on each patch vector, s = c * tanh(s_raw / c); the weights come from
    the task's ``DIASubnet`` (picked per call). Odd blocks transform the first half (halves alternate).

    Args:
        dim: D.
        clamp: soft clamp c.
        swap: transform the first half (odd blocks).
    """

    def __init__(self, dim: int, clamp: float, swap: bool) -> None:
        super().__init__(dim - dim // 2 if swap else dim // 2, clamp)
        self.dim = dim
        self.swap = swap

    def coefficients(self, x1: Tensor, weights: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        s_raw, t = DIASubnet.run(x1, weights)
        return s_raw / self.clamp, t

    def _swap(self, x: Tensor, inverse: bool) -> Tensor:
        if not self.swap:
            return x
        cut = self.dim // 2 if not inverse else self.dim - self.dim // 2
        return torch.cat([x[..., cut:], x[..., :cut]], dim=-1)

    def forward(self, x: Tensor, weights: Sequence[Tensor], rev: bool = False) -> tuple[Tensor, Tensor]:
        """Args: x (N, D), or (B, T, D) with weights picked per image. Returns (y, log|det J| (N,) or
        (B, T)) of the direction run."""
        y, log_det = self.couple(self._swap(x, inverse=False), weights, rev=rev)
        return self._swap(y, inverse=True), log_det


@fusable
def coupling_forward(x: Tensor, block: MoLECouplingBlock, picked: Sequence[Optional[Expert]]) -> tuple[Tensor, Tensor]:
    """``block(x, picked)``; the module and tensors are arguments, so under ``--compile_flow`` one
    compiled kernel set serves every block and every task."""
    return block(x, picked)


@fusable
def dia_forward(x: Tensor, blocks: Sequence[DIABlock], weights: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
    """Rows x ((N, D), or (B, T, D) per image) through the DIA blocks in order, block k with
    ``weights[k]``; returns (y, summed log|det J|)."""
    log_det = torch.zeros(x.shape[:-1], device=x.device, dtype=x.dtype)
    for block, w in zip(blocks, weights):
        x, ld = block(x, w)
        log_det = log_det + ld
    return x, log_det
