"""LoRALinear (a shared linear layer with one low-rank expert per task) and MoLESubnet.

The task whose expert is used is passed explicitly to ``forward`` (no hidden "active task"
state): an int (one expert for the whole batch) or a ``(B,)`` tensor of task ids (image ``b``
uses expert ``ids[b]``: a routed batch of mixed classes in one pass, for scoring).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


Expert = tuple[Tensor, Tensor, Tensor]  # (A, B, b_t) of one task, or of each image (stacked)


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise, stride-1, 'same'-padded ``conv2d`` whose input gradient is the same convolution with
    the kernel flipped (exact for stride 1; the two differ only in summation order).

    On CUDA, autograd's own input gradient of a depthwise float32 convolution is ATen's generic
    kernel, slower than the forward convolution's kernel, which the flipped form runs again
    (docs/performance.md). Kernel and bias gradients (task 0 only: the conv is shared) are
    autograd's own.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor
                 ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-2, -1), padding=ctx.padding, groups=weight.shape[0])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.needs_input_grad[2] else None, [1, 1], [ctx.padding] * 2,
                [1, 1], False, [0, 0], weight.shape[0], [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a depthwise, stride-1 conv with odd kernel and 'same' padding (x: (B, C, H, W)),
    through ``_DepthwiseConv``."""
    return _DepthwiseConv.apply(x, conv.weight, conv.bias, conv.padding[0])


def pick_experts(tensors: Sequence[Tensor], experts: Tensor) -> Tensor:
    """``(B, *shape)``: row ``b`` is ``tensors[experts[b]]`` (one task's tensor per image)."""
    return torch.stack(tuple(tensors))[experts]


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

    @property
    def num_experts(self) -> int:
        return len(self.lora_A)

    def add_expert(self) -> None:
        """Append a new task's expert (no-op when rank is 0)."""
        if self.rank == 0:
            return
        weight = self.base.weight
        a = torch.empty(self.rank, self.base.in_features, device=weight.device, dtype=weight.dtype)
        bound = math.sqrt(6.0 / (self.rank + self.base.in_features))
        a.uniform_(-bound, bound)
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.base.out_features, self.rank,
                                                    device=weight.device, dtype=weight.dtype)))
        self.task_bias.append(nn.Parameter(torch.zeros(self.base.out_features,
                                                       device=weight.device, dtype=weight.dtype)))

    def forward(self, x: Tensor, task_id: int | Tensor) -> Tensor:
        """Apply the base layer plus expert ``task_id``.

        Args:
            x: (..., in_features); (B, ..., in_features) when ``task_id`` is a tensor.
            task_id: index of the expert to use, or a (B,) tensor of expert ids on ``x``'s device
                (valid ids: checked by the caller).

        Returns:
            (..., out_features).
        """
        return self.run_expert(x, self.expert(task_id))

    def expert(self, task_id: int | Tensor) -> Optional[Expert]:
        """The tensors of expert ``task_id``: (A (r, in), B (out, r), b_t (out,)); for a (B,) tensor of
        ids, each stacked per image: (B, r, in), (B, out, r), (B, out). None when the rank is 0."""
        if self.rank == 0:
            return None
        if isinstance(task_id, Tensor):
            return (pick_experts(self.lora_A, task_id), pick_experts(self.lora_B, task_id),
                    pick_experts(self.task_bias, task_id))
        if not 0 <= task_id < self.num_experts:
            raise IndexError(f"task {task_id} has no LoRA expert (experts: {self.num_experts})")
        return self.lora_A[task_id], self.lora_B[task_id], self.task_bias[task_id]

    def run_expert(self, x: Tensor, expert: Optional[Expert]) -> Tensor:
        """The layer with the given expert tensors (from ``expert``; per image when they are stacked)."""
        if expert is None:
            return self.base(x)
        lora_a, lora_b, task_bias = expert
        if lora_a.dim() == 3:
            return self._run_per_image(x, lora_a, lora_b, task_bias)
        # One product with the merged weight W + s B_t A_t (out x r x in: small next to the patches'
        # product) and both biases in its epilogue. Unmerged, the low-rank term costs two thin
        # products forward and four backward, each a full pass over the patches; merged, backward
        # needs one gradient of the
        # merged weight, from which those of A_t and B_t are small products.
        weight = torch.addmm(self.base.weight, lora_b, lora_a, alpha=self.scaling)
        return F.linear(x, weight, self.base.bias + task_bias)

    def _run_per_image(self, x: Tensor, lora_a: Tensor, lora_b: Tensor, task_bias: Tensor) -> Tensor:
        """Image ``b`` of ``x`` (B, ..., in) through its own expert (row ``b`` of each stacked tensor):
        the shared product for the whole batch, the low-rank terms as batched products."""
        flat = x.reshape(x.shape[0], -1, x.shape[-1])                          # (B, T, in)
        out = F.linear(flat, self.base.weight, self.base.bias)                 # (B, T, out)
        out.add_(task_bias.unsqueeze(1))
        out.baddbmm_(torch.bmm(flat, lora_a.transpose(1, 2)), lora_b.transpose(1, 2), alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

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

    def context_alpha(self) -> Tensor:
        return 0.2 * torch.sigmoid(self.context_gate)

    def experts(self, task_id: int | Tensor) -> list[Optional[Expert]]:
        """The expert tensors of ``task_id`` (an int, or one id per image) for the four layers."""
        return [layer.expert(task_id) for layer in self.lora_layers()]

    def forward(self, u1: Tensor, task_id: int | Tensor) -> tuple[Tensor, Tensor]:
        """Compute coupling coefficients.

        Args:
            u1: (B, H, W, d_in) conditioning half on the patch grid.
            task_id: expert to use, or a (B,) tensor of experts (one per image).

        Returns:
            (s_logits, t), each (B, H, W, d_out).
        """
        return self.run(u1, self.experts(task_id))

    def run(self, u1: Tensor, experts: Sequence[Optional[Expert]]) -> tuple[Tensor, Tensor]:
        """``forward`` with the experts' tensors given (``experts(task_id)``)."""
        scale1, scale2, shift1, shift2 = experts
        scale_in = u1
        if self.use_context:
            grid = u1.permute(0, 3, 1, 2)
            ctx = depthwise_conv2d(grid, self.context_conv).permute(0, 2, 3, 1)
            scale_in = torch.cat([u1, self.context_alpha() * ctx], dim=-1)
        s = self.scale2.run_expert(F.relu(self.scale1.run_expert(scale_in, scale1)), scale2)
        t = self.shift2.run_expert(F.relu(self.shift1.run_expert(u1, shift1)), shift2)
        return s, t
