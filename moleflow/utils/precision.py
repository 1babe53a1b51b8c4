"""float32 matrix-product and convolution precision on CUDA (TF32 or full float32), set for a block of code."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def matmul_tf32(device: torch.device, enabled: bool) -> Iterator[None]:
    """Within the block, CUDA float32 matrix products use TF32 when ``enabled`` (else full float32).

    TF32 rounds the operands to 10 mantissa bits and accumulates in float32 (relative error about 1e-3
    per product). The previous setting is restored on exit; on other devices this does nothing.
    """
    with _tf32_switch(device, torch.backends.cuda.matmul, enabled):
        yield


@contextlib.contextmanager
def conv_tf32(device: torch.device, enabled: bool) -> Iterator[None]:
    """Within the block, cuDNN float32 convolutions on CUDA use TF32 when ``enabled`` (its default is
    on); the previous setting is restored on exit. On other devices this does nothing."""
    with _tf32_switch(device, torch.backends.cudnn, enabled):
        yield


@contextlib.contextmanager
def _tf32_switch(device: torch.device, backend: Any, enabled: bool) -> Iterator[None]:
    """Set ``backend.allow_tf32`` for the block on CUDA, restoring it on exit."""
    if device.type != "cuda":
        yield
        return
    before = backend.allow_tf32
    backend.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        backend.allow_tf32 = before
