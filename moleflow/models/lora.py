"""LoRALinear (a shared linear layer with one low-rank expert per task) and MoLESubnet.

The expert is passed explicitly (no hidden "active task" state): ``expert(task)`` picks its
tensors (``experts.select``: one task, or one per image) and ``run_expert`` applies them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moleflow.models import experts
from moleflow.models.experts import Expert, Task
from moleflow.models.kernels import depthwise_conv2d


class LoRALinear(nn.Module):
    """h = W x + b + (alpha / r) * B_t A_t x + b_t.

    W, b are shared (trained on task 0, then frozen). Every task t, task 0 included, owns
    A_t (r, in) Xavier-uniform, B_t (out, r) zero and b_t (out,) zero, so a new expert starts
    exactly as the base layer. With ``rank=0`` the layer is a plain linear layer.

    Args:
        in_features: input width.
        out_features: output width.
        rank: LoRA rank r (0 disables experts).
        alpha: LoRA scaling numerator (scale = alpha / r).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.rank = rank
        self.scaling = alpha / rank if rank > 0 else 0.0
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.task_bias = nn.ParameterList()

    def add_expert(self) -> None:
        """Append a new task's expert (no-op when rank is 0)."""
        if self.rank == 0:
            return
        like = {"device": self.base.weight.device, "dtype": self.base.weight.dtype}
        a = torch.empty(self.rank, self.base.in_features, **like)
        bound = math.sqrt(6.0 / (self.rank + self.base.in_features))
        a.uniform_(-bound, bound)
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.base.out_features, self.rank, **like)))
        self.task_bias.append(nn.Parameter(torch.zeros(self.base.out_features, **like)))

    def forward(self, x: Tensor, task: Task) -> Tensor:
        """Apply the base layer plus expert ``task`` (x: (..., in); (B, ..., in) for one task per image)."""
        return self.run_expert(x, self.expert(task))

    def expert(self, task: Task) -> Optional[Expert]:
        """The tensors of expert ``task``: (A (r, in), B (out, r), b_t (out,)), stacked per image for
        one task per image; None when the rank is 0."""
        if self.rank == 0:
            return None
        return (experts.select(self.lora_A, task), experts.select(self.lora_B, task),
                experts.select(self.task_bias, task))

    def run_expert(self, x: Tensor, expert: Optional[Expert]) -> Tensor:
        """The layer with the given expert tensors (from ``expert``)."""
        return experts.lora_linear(x, self.base, expert, self.scaling)

    def expert_parameters(self, task_id: int) -> list[nn.Parameter]:
        """Parameters owned by one task."""
        if self.rank == 0:
            return []
        return [self.lora_A[task_id], self.lora_B[task_id], self.task_bias[task_id]]


class MoLESubnet(nn.Module):
    """Coupling subnet with per-task LoRA experts; returns scale and shift logits for u2.

    Scale branch input: [u1 ; a * DWConv_k(u1)] (scale context, zero-initialised depthwise
    conv on the patch grid, a = 0.2 * sigmoid(p), p0 = 0) or u1 alone without scale context.
    Shift branch input: u1. Each branch: LoRALinear(-> 2 d) -> ReLU -> LoRALinear(-> d).

    Args:
        dim_in: width of u1.
        dim_out: width of u2 (= d).
        rank: LoRA rank (0 = no LoRA).
        alpha: LoRA alpha.
        scale_context_kernel: kernel of the depthwise conv, or 0 for no scale context.
    """

    def __init__(self, dim_in: int, dim_out: int, rank: int, alpha: float,
                 scale_context_kernel: int) -> None:
        super().__init__()
        hidden = 2 * dim_out
        self.use_context = scale_context_kernel > 0
        if self.use_context:
            self.context_conv = nn.Conv2d(dim_in, dim_in, scale_context_kernel,
                                          padding=scale_context_kernel // 2, groups=dim_in)
            nn.init.zeros_(self.context_conv.weight)
            nn.init.zeros_(self.context_conv.bias)
            self.context_gate = nn.Parameter(torch.zeros(()))
        scale_in = 2 * dim_in if self.use_context else dim_in
        self.scale1 = LoRALinear(scale_in, hidden, rank, alpha)
        self.scale2 = LoRALinear(hidden, dim_out, rank, alpha)
        self.shift1 = LoRALinear(dim_in, hidden, rank, alpha)
        self.shift2 = LoRALinear(hidden, dim_out, rank, alpha)

    def lora_layers(self) -> list[LoRALinear]:
        return [self.scale1, self.scale2, self.shift1, self.shift2]

    def experts(self, task: Task) -> list[Optional[Expert]]:
        """The expert tensors of ``task`` for the four layers."""
        return [layer.expert(task) for layer in self.lora_layers()]

    def forward(self, u1: Tensor, picked: Sequence[Optional[Expert]]) -> tuple[Tensor, Tensor]:
        """Scale and shift logits of the coupling.

        Args:
            u1: (B, H, W, d_in) conditioning half on the patch grid.
            picked: ``experts(task)``.

        Returns:
            (s_logits, t), each (B, H, W, d_out).
        """
        scale1, scale2, shift1, shift2 = picked
        scale_in = u1
        if self.use_context:
            grid = u1.permute(0, 3, 1, 2)
            ctx = depthwise_conv2d(grid, self.context_conv).permute(0, 2, 3, 1)
            scale_in = torch.cat([u1, 0.2 * torch.sigmoid(self.context_gate) * ctx], dim=-1)
        s = self.scale2.run_expert(F.relu(self.scale1.run_expert(scale_in, scale1)), scale2)
        t = self.shift2.run_expert(F.relu(self.shift1.run_expert(u1, shift1)), shift2)
        return s, t
