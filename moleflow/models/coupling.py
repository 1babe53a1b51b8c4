"""Invertible blocks of the flow: shared MoLE coupling blocks and per-task DIA blocks.

Every block maps (x, task) -> (y, log|det J|) per patch and has an exact reverse.

Why the MoLE block is custom rather than a FrEIA module: the loss and the anomaly score need
the log-determinant *per patch*, but FrEIA's couplings sum it over all non-batch axes; the
subnet also needs the patch grid (depthwise scale-context conv) and the task id to pick the
LoRA expert, neither of which FrEIA's ``subnet(x)`` call can carry. The fixed permutation is
ours too because FrEIA's ``PermuteRandom`` reseeds numpy's global RNG as a side effect.
The DIA blocks act on single patch vectors, where FrEIA's ``AffineCouplingOneSided`` fits
exactly, so they use it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from FrEIA.modules import AffineCouplingOneSided
from torch import Tensor, nn

from moleflow.models.lora import MoLESubnet, pick_experts


class _PermuteLastDim(torch.autograd.Function):
    """``x[..., perm]`` whose backward is the inverse gather ``g[..., perm_inv]``.

    Plain advanced indexing differentiates through ``index_put_(accumulate=True)``, which on CUDA
    sorts all N*D indices in every backward pass; for a permutation the gradient is exactly the
    inverse permutation of the incoming gradient (each input feeds one output), so the values are
    the same, bit for bit, at the cost of one gather.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, perm: Tensor, perm_inv: Tensor) -> Tensor:
        ctx.save_for_backward(perm_inv)
        return x.index_select(-1, perm)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        (perm_inv,) = ctx.saved_tensors
        return grad.index_select(-1, perm_inv), None, None


def permute_last_dim(x: Tensor, perm: Tensor, perm_inv: Tensor) -> Tensor:
    """``x[..., perm]`` (``perm_inv`` = argsort(perm)) with a gather as its gradient."""
    return _PermuteLastDim.apply(x, perm, perm_inv)


class MoLECouplingBlock(nn.Module):
    """Affine coupling (AllInOneBlock style) followed by a fixed, seeded channel permutation.

    u1, u2 = split(x); (a_s, a_t) = 0.1 * subnet(u1, task); s = c * tanh(a_s);
    u2' = u2 * exp(s) + a_t; y = permute([u1, u2']); log|det J_p| = sum(s).

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
        super().__init__()
        self.split1 = dim // 2
        self.split2 = dim - self.split1
        self.clamp = clamp
        self.subnet = MoLESubnet(self.split1, self.split2, rank, alpha, scale_context_kernel)
        generator = torch.Generator().manual_seed(permutation_seed)
        perm = torch.randperm(dim, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def _coefficients(self, u1: Tensor, task_id: int | Tensor) -> tuple[Tensor, Tensor]:
        s_logits, t = self.subnet(u1, task_id)
        s = self.clamp * torch.tanh(0.1 * s_logits)
        return s, 0.1 * t

    def forward(self, x: Tensor, task_id: int | Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        """Run the block.

        Args:
            x: (B, H, W, D).
            task_id: LoRA expert to use, or a (B,) tensor of experts (one per image).
            rev: run the inverse.

        Returns:
            (y (B, H, W, D), log|det J| (B, H, W)) of the direction run.
        """
        if rev:
            x = permute_last_dim(x, self.perm_inv, self.perm)
        u1, u2 = x[..., : self.split1], x[..., self.split1:]
        s, t = self._coefficients(u1, task_id)
        if rev:
            y2 = (u2 - t) * torch.exp(-s)
            return torch.cat([u1, y2], dim=-1), -s.sum(dim=-1)
        y2 = u2 * torch.exp(s) + t
        return permute_last_dim(torch.cat([u1, y2], dim=-1), self.perm, self.perm_inv), s.sum(dim=-1)


class DIASubnet(nn.Module):
    """Separate s and t MLPs (in -> h -> h -> out/2 each), last layers zero-initialised.

    Returns [s / clamp ; t] so that FrEIA's ``clamp * tanh(.)`` gives s = c * tanh(s_raw / c).
    """

    def __init__(self, dim_in: int, dim_out: int, hidden: int, clamp: float) -> None:
        super().__init__()
        half = dim_out // 2
        self.clamp = clamp
        self.s_net = self._mlp(dim_in, hidden, half)
        self.t_net = self._mlp(dim_in, hidden, half)

    @staticmethod
    def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
        last = nn.Linear(hidden, dim_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), last)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.s_net(x) / self.clamp, self.t_net(x)], dim=-1)

    @staticmethod
    def per_image(subnets: Sequence["DIASubnet"], x: Tensor, experts: Tensor) -> Tensor:
        """Image ``b`` of ``x`` (B, T, in) through ``subnets[experts[b]]``, as batched products."""

        def mlp(nets: list[nn.Sequential]) -> Tensor:
            h = x
            for i in (0, 2, 4):  # the Linear layers (ReLU between them)
                weight = pick_experts([net[i].weight for net in nets], experts)      # (B, out, in)
                bias = pick_experts([net[i].bias for net in nets], experts)          # (B, out)
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
                h = F.relu(h) if i < 4 else h
            return h

        return torch.cat([mlp([n.s_net for n in subnets]) / subnets[0].clamp, mlp([n.t_net for n in subnets])], dim=-1)


class DIABlock(nn.Module):
    """One task-owned affine coupling on each patch vector (FrEIA AffineCouplingOneSided).

    Odd blocks transform the first half instead of the second (halves alternate); each block
    starts as the identity because the subnets' last layers are zero.

    Args:
        dim: D.
        hidden: hidden width of the s and t MLPs.
        clamp: soft clamp c.
        swap: transform the first half (odd blocks).
    """

    def __init__(self, dim: int, hidden: int, clamp: float, swap: bool) -> None:
        super().__init__()
        self.dim = dim
        self.swap = swap
        first = dim - dim // 2 if swap else dim // 2

        def subnet(c_in: int, c_out: int) -> nn.Module:
            return DIASubnet(c_in, c_out, hidden, clamp)

        self.coupling = AffineCouplingOneSided([(dim,)], subnet_constructor=subnet, clamp=clamp,
                                               clamp_activation="TANH", split_len=first)

    def _swap(self, x: Tensor, inverse: bool) -> Tensor:
        if not self.swap:
            return x
        cut = self.dim // 2 if not inverse else self.dim - self.dim // 2
        return torch.cat([x[..., cut:], x[..., :cut]], dim=-1)

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        """Args: x (N, D). Returns (y (N, D), log|det J| (N,))."""
        (y,), log_det = self.coupling([self._swap(x, inverse=False)], rev=rev)
        return self._swap(y, inverse=True), log_det

    @staticmethod
    def per_image(blocks: Sequence["DIABlock"], x: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
        """Forward pass of image ``b`` of ``x`` (B, T, D) through ``blocks[experts[b]]``.

        ``blocks`` hold the same position (k-th DIA block) of every task. The coupling is that of
        FrEIA's ``AffineCouplingOneSided`` (its split, clamp and clamp function are read from
        the block), with each image's own subnet weights.

        Returns:
            (y (B, T, D), log|det J| (B, T)).
        """
        ref = blocks[0]
        coupling = ref.coupling
        x1, x2 = torch.split(ref._swap(x, inverse=False), [coupling.split_len1, coupling.split_len2], dim=-1)
        a = DIASubnet.per_image([b.coupling.subnet for b in blocks], x1, experts)
        s = coupling.clamp * coupling.f_clamp(a[..., :coupling.split_len2])
        y2 = x2 * torch.exp(s) + a[..., coupling.split_len2:]
        return ref._swap(torch.cat([x1, y2], dim=-1), inverse=True), s.sum(dim=-1)
