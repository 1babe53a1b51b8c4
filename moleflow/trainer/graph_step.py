"""A training step recorded once as a CUDA graph and replayed for every full batch.

The flow's training step is about a thousand small kernels (24 LoRA layers, couplings, DIA,
loss, backward, clipping, fused optimizer). Launched one by one from Python, the host cannot
keep up with the GPU; replaying them as one graph removes that cost and changes no arithmetic:
the graph holds the same kernels on the same inputs.

What makes the step safe to record: the batch is copied into a fixed input buffer; the learning
rate is a device tensor filled before each replay; a non-finite batch is neutralised on the
device through the fused optimizer's ``found_inf``; losses and skip counts are summed into
device tensors. Nothing in the step reads a value back to the host.

Recording needs a few untimed passes first (lazy state, cuBLAS workspaces). They run *dry*:
``found_inf`` is forced to 1, so the optimizer leaves parameters, moments and step counts exactly
as they were, and the sums are not touched. Training is therefore the same sequence of updates as
without the graph.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

StepBody = Callable[[Tensor, bool], None]  # (batch, dry) -> None; runs one full training step

WARMUP_PASSES = 2


class GraphedStep:
    """Run ``body`` on batches of one fixed shape, as a replayed CUDA graph when ``capture`` is set.

    Args:
        body: one training step on the batch it is given; ``dry=True`` must leave every parameter,
            optimizer state and running sum unchanged.
        shape: the batch shape (full batches only; a smaller last batch runs ``body`` directly).
        device: where the batch lives.
        capture: record a CUDA graph (needs CUDA); otherwise ``body`` runs on the input buffer
            directly, which is the same computation without the graph.
        on_failure: told (one line) when recording fails and the step runs without the graph.
    """

    def __init__(self, body: StepBody, shape: tuple[int, ...], device: torch.device, capture: bool,
                 on_failure: Optional[Callable[[str], None]] = None) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs a CUDA device, got {device}")
        self.body = body
        self.on_failure = on_failure
        self.capture = capture
        self.input = torch.zeros(shape, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._warmed_up = False

    def __call__(self, batch: Tensor) -> None:
        """Train on ``batch`` (shape ``self.input.shape``, any device)."""
        self.input.copy_(batch, non_blocking=True)
        if not self._warmed_up:
            self._warm_up()
            if self.capture:
                self.graph = self._record()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body(self.input, False)

    def _record(self) -> Optional[torch.cuda.CUDAGraph]:
        """Record one step (runs nothing). If recording fails, say so once and step without it:
        the same body, so the same updates, only slower."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.body(self.input, False)
        except RuntimeError as error:
            self.capture = False
            if self.on_failure is not None:
                self.on_failure(f"CUDA graph recording failed ({str(error).splitlines()[0][:200]}); "
                                f"training goes on without it (--no_cuda_graphs skips the attempt)")
            return None
        return graph

    def _warm_up(self) -> None:
        """Dry passes (recording needs them on a side stream; without it they run all the same,
        so that a CPU test covers them too)."""
        self._warmed_up = True
        if not self.capture:
            for _ in range(WARMUP_PASSES):
                self.body(self.input, True)
            return
        device = self.input.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                self.body(self.input, True)
        torch.cuda.current_stream(device).wait_stream(side)
