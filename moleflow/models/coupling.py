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

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from FrEIA.modules import AffineCouplingOneSided
from torch import Tensor, nn

from moleflow.models.fusion import fusable
from moleflow.models.lora import Expert, MoLESubnet, pick_experts


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


@fusable
def coupling_forward(x: Tensor, block: "MoLECouplingBlock", experts: Sequence[Optional[Expert]]) -> tuple[Tensor, Tensor]:
    """Forward pass of ``block`` with the given LoRA expert tensors (``block.subnet.experts(task)``).

    The block's module and the expert tensors are arguments, so under ``--compile_flow`` one
    compiled kernel set serves every block and every task.
    """
    u1, u2 = x[..., : block.split1], x[..., block.split1:]
    s, t = block.coefficients(*block.subnet.run(u1, experts))
    y2 = u2 * torch.exp(s) + t
    return permute_last_dim(torch.cat([u1, y2], dim=-1), block.perm, block.perm_inv), s.sum(dim=-1)


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

    def coefficients(self, s_logits: Tensor, t_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The subnet's logits -> (log-scale s = c tanh(0.1 s_logits), shift 0.1 t_logits)."""
        return self.clamp * torch.tanh(0.1 * s_logits), 0.1 * t_logits

    def forward(self, x: Tensor, task_id: int | Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        """Run the block.

        Args:
            x: (B, H, W, D).
            task_id: LoRA expert to use, or a (B,) tensor of experts (one per image).
            rev: run the inverse.

        Returns:
            (y (B, H, W, D), log|det J| (B, H, W)) of the direction run.
        """
        if not rev:
            return coupling_forward(x, self, self.subnet.experts(task_id))
        x = permute_last_dim(x, self.perm_inv, self.perm)
        u1, u2 = x[..., : self.split1], x[..., self.split1:]
        s, t = self.coefficients(*self.subnet(u1, task_id))
        y2 = (u2 - t) * torch.exp(-s)
        return torch.cat([u1, y2], dim=-1), -s.sum(dim=-1)


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
    def pick(subnets: Sequence["DIASubnet"], experts: Tensor) -> tuple[Tensor, ...]:
        """Image ``b``'s weights and biases (``subnets[experts[b]]``), stacked per Linear layer:
        (weight (B, out, in), bias (B, out)) for the s net's three layers, then the t net's."""
        picked: list[Tensor] = []
        for nets in ([n.s_net for n in subnets], [n.t_net for n in subnets]):
            for i in (0, 2, 4):  # the Linear layers (ReLU between them)
                picked.append(pick_experts([net[i].weight for net in nets], experts))
                picked.append(pick_experts([net[i].bias for net in nets], experts))
        return tuple(picked)

    @staticmethod
    def run_picked(x: Tensor, picked: tuple[Tensor, ...], clamp: float) -> Tensor:
        """Image ``b`` of ``x`` (B, T, in) through its own subnet (``pick``), as batched products."""

        def mlp(layers: tuple[Tensor, ...]) -> Tensor:
            h = x
            for i in range(3):
                weight, bias = layers[2 * i], layers[2 * i + 1]                      # (B, out, in), (B, out)
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
                h = F.relu(h) if i < 2 else h
            return h

        return torch.cat([mlp(picked[:6]) / clamp, mlp(picked[6:])], dim=-1)


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
    def pick(blocks: Sequence["DIABlock"], experts: Tensor) -> tuple[Tensor, ...]:
        """``blocks`` hold the same position (k-th DIA block) of every task; image ``b``'s subnet
        weights (``blocks[experts[b]]``), stacked (``DIASubnet.pick``)."""
        return DIASubnet.pick([b.coupling.subnet for b in blocks], experts)

    def run_picked(self, x: Tensor, picked: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Forward pass of image ``b`` of ``x`` (B, T, D) with its own subnet weights (``pick``).

        The coupling is that of FrEIA's ``AffineCouplingOneSided`` (its split, clamp and clamp
        function are read from this block, which holds the same position for another task).

        Returns:
            (y (B, T, D), log|det J| (B, T)).
        """
        coupling = self.coupling
        x1, x2 = torch.split(self._swap(x, inverse=False), [coupling.split_len1, coupling.split_len2], dim=-1)
        a = DIASubnet.run_picked(x1, picked, coupling.subnet.clamp)
        s = coupling.clamp * coupling.f_clamp(a[..., :coupling.split_len2])
        y2 = x2 * torch.exp(s) + a[..., coupling.split_len2:]
        return self._swap(torch.cat([x1, y2], dim=-1), inverse=True), s.sum(dim=-1)


@fusable
def dia_forward(x: Tensor, blocks: Sequence[DIABlock]) -> tuple[Tensor, Tensor]:
    """x (N, D) through one task's DIA blocks in order; returns (y, summed log|det J| (N,))."""
    log_det = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for block in blocks:
        x, ld = block(x)
        log_det = log_det + ld
    return x, log_det


@fusable
def dia_forward_per_image(x: Tensor, blocks: Sequence[DIABlock], picked: Sequence[tuple[Tensor, ...]]
                          ) -> tuple[Tensor, Tensor]:
    """x (B, T, D), image ``b`` through its own task's DIA blocks: ``picked[k]`` = ``DIABlock.pick``
    of the k-th blocks; ``blocks`` = any one task's blocks (for the split and clamp)."""
    log_det = torch.zeros(x.shape[:-1], device=x.device, dtype=x.dtype)
    for block, weights in zip(blocks, picked):
        x, ld = block.run_picked(x, weights)
        log_det = log_det + ld
    return x, log_det
