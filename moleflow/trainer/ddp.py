"""One task trained by several processes (torchrun): DistributedDataParallel over the flow, each
process a slice of every batch.

Every process holds all training features and draws the same batch order (same seed), so all see
the same global batch of B images. Process r computes the mean loss L_r over its contiguous slice of
B_r images; the loss is a per-image mean (``models/loss``), so the global batch's loss is
sum_r (B_r / B) L_r. Each of the P processes back-propagates L_r * B_r * P / B and DDP averages the
gradients: the gradient of the global batch's mean loss (up to summation order), identical on every
process, so the clip and the optimizer step keep the copies of the flow identical.

The loss value a step sees (for the non-finite check and the logged loss) is the global batch's
loss, summed over the processes: a batch is skipped on all processes or on none. A process whose
slice is empty (a last batch smaller than P) runs its forward on one image with weight 0, so it
still takes part in DDP's gradient average.

With one process ``wrap`` and ``sharded_loss`` return what they are given.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moleflow.distributed import all_sum, shard_range, world

LossFn = Callable[[Tensor], Tensor]

# DDP's switch for re-sending buffers at every forward was renamed (the flow's buffers are fixed
# and identical everywhere: nothing to send).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel for its current trainable set (wrap again when the set
    changes); ``model`` itself with one process.

    ``static_graph``: every step uses the same parameters, so DDP finds the ones a task never uses
    once (on the first step) instead of searching the graph at every step."""
    if not world().active:
        return model
    # A depthwise conv weight (C, 1, k, k) gets a gradient whose stride for its size-1 dimension differs
    # from DDP's bucket view; both hold the elements in the same order, so DDP's warning says nothing.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, static_graph=True, **_NO_BUFFER_SYNC)


def sharded_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` over a global batch, computed on this process's slice (module docstring); with one
    process ``loss_fn`` itself."""
    if not world().active:
        return loss_fn

    def loss(batch: Tensor) -> Tensor:
        n = batch.shape[0]
        lo, hi = shard_range(n)
        mine = batch[lo:hi] if hi > lo else batch[:1]
        local = loss_fn(mine) * ((hi - lo) * world().size / n)
        total = all_sum(local.detach()) / world().size  # the global batch's loss, the same everywhere
        return total + (local - local.detach())  # that value, with this slice's gradient

    return loss
