"""Which task's expert each image uses: the one place that knows the one-expert-per-image mode.

A pass of the flow runs with ``task``: an int (the whole batch uses that task's LoRA expert, adapter
and DIA weights) or a ``(B,)`` tensor of task ids (image ``b`` uses task ``task[b]``'s, so a routed
batch of mixed classes is scored in one pass). The model picks each task-owned tensor once per pass
with :func:`select` (the task's own tensor, or the tasks' tensors stacked per image, ``(B, ...)``);
the functions below apply a picked tensor either way. Picking happens outside the fused functions
(``fusion.py``), which take the picked tensors as arguments: one compiled graph serves every task.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Task = Union[int, Tensor]  # one task for the batch, or a (B,) tensor: one per image
Expert = tuple[Tensor, Tensor, Tensor]  # LoRA (A, B, b_t) of one task, or stacked per image


def check(task: Task, num_tasks: int, rev: bool = False) -> None:
    """Raise if ``task`` names a task the model does not have (or one per image for a reverse pass)."""
    if not isinstance(task, Tensor):
        if not 0 <= task < num_tasks:
            raise IndexError(f"task {task} does not exist (the model has {num_tasks} tasks)")
        return
    if rev:
        raise ValueError("the reverse pass takes one task id (an int), not one per image")
    if task.dim() != 1:
        raise ValueError(f"per-image task ids must be a (B,) tensor, got shape {tuple(task.shape)}")
    if task.device.type == "cpu" and task.numel():  # on a GPU: checked by the caller (no sync)
        low, high = int(task.min()), int(task.max())
        if low < 0 or high >= num_tasks:
            raise IndexError(f"task ids {low}..{high} out of range (the model has {num_tasks} tasks)")


def select(per_task: Sequence[Tensor], task: Task) -> Tensor:
    """``per_task[task]``, or for one task per image ``(B, *shape)``: row ``b`` is ``per_task[task[b]]``."""
    if isinstance(task, Tensor):
        return torch.stack(tuple(per_task))[task]
    return per_task[task]


def select_params(per_task: Sequence[nn.Module], task: Task) -> tuple[Tensor, ...]:
    """Every parameter of the per-task modules (all built alike), in registration order, picked for ``task``."""
    if isinstance(task, Tensor):
        return tuple(select(params, task) for params in zip(*(m.parameters() for m in per_task)))
    return tuple(per_task[task].parameters())


def rows(x: Tensor, task: Task) -> Tensor:
    """(B, H, W, D) patches as rows for per-patch layers: (B*H*W, D) for one task, (B, H*W, D) for one
    task per image (each image's rows together)."""
    return x.reshape(x.shape[0], -1, x.shape[-1]) if isinstance(task, Tensor) else x.reshape(-1, x.shape[-1])


def channels(value: Tensor, x: Tensor) -> Tensor:
    """A picked per-channel tensor, (C,) or (B, C), shaped to broadcast over ``x`` (B, ..., C)."""
    if value.dim() == 1:
        return value
    return value.view(value.shape[0], *([1] * (x.dim() - 2)), value.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x W^T + b`` with a picked weight (out, in) / (B, out, in) and bias (out,) / (B, out); for one
    task per image ``x`` is (B, T, in)."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last axis with a picked affine weight and bias ((C,) or (B, C))."""
    if weight.dim() == 1:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * channels(weight, x) + channels(bias, x)


def lora_linear(x: Tensor, base: nn.Linear, expert: Optional[Expert], scaling: float) -> Tensor:
    """``W x + b + scaling * B_t A_t x + b_t`` with a picked LoRA expert (None: the base layer alone).

    One task: one product with the merged weight W + s B_t A_t (out x r x in: small next to the
    patches' product) and both biases in its epilogue; backward then needs one gradient of the
    merged weight, from which those of A_t and B_t are small products. One task per image (x: (B,
    ..., in)): the shared product for the whole batch, the low-rank terms as batched products.
    """
    if expert is None:
        return base(x)
    lora_a, lora_b, task_bias = expert
    if lora_a.dim() == 2:
        weight = torch.addmm(base.weight, lora_b, lora_a, alpha=scaling)
        return F.linear(x, weight, base.bias + task_bias)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])                          # (B, T, in)
    out = F.linear(flat, base.weight, base.bias)                           # (B, T, out)
    out.add_(task_bias.unsqueeze(1))
    out.baddbmm_(torch.bmm(flat, lora_a.transpose(1, 2)), lora_b.transpose(1, 2), alpha=scaling)
    return out.view(*x.shape[:-1], out.shape[-1])
