"""Speed kernels: autograd functions whose backward pass is cheaper than autograd's own, with the
same values (tests: ``test_permutation_gradient_is_the_inverse_gather``,
``test_depthwise_conv_gradients_equal_autograds``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _PermuteLastDim(torch.autograd.Function):
    """``x[..., perm]`` whose backward is the inverse gather ``g[..., perm_inv]``: bit for bit the same
    gradient (each input feeds one output), without the sort of all N*D indices that advanced
    indexing's backward (``index_put_(accumulate=True)``) runs on CUDA.
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
    """``x[..., perm]`` (``perm_inv`` = argsort(perm)) with a gather as its gradient (a TorchScript trace,
    ``moleflow.export``, records the forward op: the same values)."""
    if torch.jit.is_tracing():
        return x.index_select(-1, perm)
    return _PermuteLastDim.apply(x, perm, perm_inv)


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise, stride-1, 'same'-padded ``conv2d`` whose input gradient is the same convolution with
    the kernel flipped (exact for stride 1; only the summation order differs), which on CUDA runs the
    forward's kernel instead of ATen's slower generic one (docs/performance.md). Kernel and bias
    gradients (task 0 only: the conv is shared) are autograd's own.
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
    through ``_DepthwiseConv`` (a TorchScript trace records the forward op: the same values)."""
    if torch.jit.is_tracing():
        return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding[0], groups=conv.weight.shape[0])
    return _DepthwiseConv.apply(x, conv.weight, conv.bias, conv.padding[0])
