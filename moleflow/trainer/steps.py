"""How a training step runs, chosen once per trainer: the method's loop only calls ``step(batch)``.

* ``PlainStep`` (CPU): loss, backward, gradient clip, optimizer step; a batch whose loss is not
  finite is seen on the host and not stepped.
* ``SyncFreeStep`` (CUDA): the fused optimizer with its learning rate in a device tensor; a
  non-finite batch is neutralised on the device through the fused step's ``found_inf`` (parameters,
  moments and step counts stay exactly as without the step), and losses and skips are summed on the
  device and read once per epoch: a step never waits for the GPU.
* recorded (``cuda_graphs``): the sync-free step of a full batch recorded once as a CUDA graph and
  replayed (no Python launch per kernel).
* compiled (``--compile_flow``): a full batch runs the graph compiled for its exact shape
  (``fusion.static_shapes``), a smaller last batch runs unfused; task 0, the only task whose
  shared weights train, trains unfused (``task_compute``).

The torch optimizer internals these paths rely on (``found_inf``, ``capturable``,
``_warned_capturable_if_run_uncaptured``) are used in this module only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from moleflow.models import fusion
from moleflow.utils.precision import matmul_tf32

LossFn = Callable[[Tensor], Tensor]  # (B, H, W, D) features -> scalar training loss
WARMUP_PASSES = 2  # dry passes before a CUDA graph is recorded (lazy state, cuBLAS workspaces)


@dataclass(frozen=True)
class Strategy:
    """Which step a trainer takes.

    Attributes:
        fused: the fused optimizer.
        sync_free: non-finite batches skipped on the device (needs ``fused``).
        graphs: full-batch steps recorded as a CUDA graph (needs ``sync_free``; see ``SyncFreeStep``).
    """

    fused: bool = False
    sync_free: bool = False
    graphs: bool = False

    @classmethod
    def for_device(cls, device: torch.device, cuda_graphs: bool) -> "Strategy":
        """On CUDA: fused, sync-free and (``cuda_graphs``) recorded; elsewhere the plain step."""
        cuda = device.type == "cuda"
        return cls(fused=cuda, sync_free=cuda, graphs=cuda and cuda_graphs)


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float, weight_decay: float,
                   strategy: Strategy, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decoupled decay, p -= lr * wd * p) or Adam (wd * p added to the gradient, L2); each
    group keeps its ``base_lr`` for :func:`set_lr`."""
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    kwargs: dict = {"weight_decay": weight_decay, "fused": True} if strategy.fused else {"weight_decay": weight_decay}
    if strategy.sync_free:
        kwargs["capturable"] = strategy.graphs  # the fused step ignores it; recording checks it
    opt = cls([{"params": params, "base_lr": lr}], lr=lr_value(lr, strategy, device), **kwargs)
    # A small last batch steps without the graph; with capturable=True torch would warn once.
    opt._warned_capturable_if_run_uncaptured = True
    return opt


def lr_value(lr: float, strategy: Strategy, device: torch.device) -> float | Tensor:
    """A group's rate: a Python float, or (sync-free) a tensor the fused step reads from memory,
    filled before each step: float32 on CUDA (the only dtype its kernel reads), float64 elsewhere
    (read as the double a float would give)."""
    if not strategy.sync_free:
        return lr
    return torch.tensor(lr, dtype=torch.float32 if device.type == "cuda" else torch.float64, device=device)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's rate = its ``base_lr`` x ``factor`` (filled in place when it is a tensor)."""
    for group in optimizer.param_groups:
        value = group["base_lr"] * factor
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


@contextlib.contextmanager
def task_compute(device: torch.device, tf32: bool, task_id: int) -> Iterator[None]:
    """How ``task_id`` trains: its matrix products' precision, and unfused for task 0 (its compiled
    graph would serve one task and take longer to compile than fusion saves on it)."""
    with matmul_tf32(device, tf32), fusion.paused(task_id == 0):
        yield


@contextlib.contextmanager
def step_fusion(full_batch: bool) -> Iterator[None]:
    """Under ``--compile_flow``: a full batch runs the graph compiled for its exact shape (one per
    run, shared by all later tasks); a smaller last batch runs unfused (its size differs from task
    to task, and compiling for each size would cost more than the few unfused steps)."""
    with fusion.static_shapes(full_batch), fusion.paused(not full_batch):
        yield


class PlainStep:
    """The plain step (module docstring): ``params`` clipped together to the global norm ``grad_clip``;
    ``batch_size`` is a full batch's size, ``device`` where the flow trains."""

    def __init__(self, loss_fn: LossFn, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 grad_clip: float, batch_size: int, device: torch.device) -> None:
        self.loss_fn, self.optimizer, self.params, self.grad_clip = loss_fn, optimizer, params, grad_clip
        self.batch_size, self.device = batch_size, device
        self.loss_sum, self.good, self.skipped = 0.0, 0, 0

    def __call__(self, feats: Tensor) -> None:
        with step_fusion(feats.shape[0] == self.batch_size):
            loss = self.loss_fn(feats.to(self.device))
        if not torch.isfinite(loss):
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            return
        self._update(loss)
        self.loss_sum += loss.item()
        self.good += 1

    def _update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()

    def end_epoch(self) -> tuple[float, int, int]:
        """(sum of finite losses, stepped batches, skipped batches) since the last call."""
        totals = (self.loss_sum, self.good, self.skipped)
        self.loss_sum, self.good, self.skipped = 0.0, 0, 0
        return totals

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class SyncFreeStep(PlainStep):
    """The sync-free step (module docstring); ``end_epoch`` reads the device's sums.

    With ``graphs`` a full batch is copied into a fixed input buffer and its step recorded once as a
    CUDA graph, then replayed (off CUDA it runs on the buffer unrecorded: how the CPU tests check this
    path). The passes before recording run *dry* (``found_inf`` forced to 1: nothing changes), so
    training is the same sequence of updates as without the graph. If recording fails the step says
    so once and runs without it.
    """

    def __init__(self, loss_fn: LossFn, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 grad_clip: float, batch_size: int, device: torch.device, graphs: bool = False,
                 on_failure: Optional[Callable[[str], None]] = None) -> None:
        super().__init__(loss_fn, optimizer, params, grad_clip, batch_size, device)
        self._sums = (torch.zeros((), dtype=torch.float64, device=device),
                      torch.zeros((), dtype=torch.long, device=device))
        self.batches = 0
        self.graphs, self.on_failure = graphs, on_failure
        self.input: Optional[Tensor] = None  # the recorded step's fixed input buffer
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def body(self, feats: Tensor, dry: bool = False) -> None:
        """One step that never reads a value back to the host (``dry``: changes nothing)."""
        loss = self.loss_fn(feats)
        bad = ~torch.isfinite(loss)
        self.optimizer.found_inf = torch.ones_like(loss) if dry else bad.float()
        self._update(loss)
        if not dry:
            self._sums[0].add_(torch.where(bad, 0.0, loss.detach().double()))
            self._sums[1].add_(bad)

    def __call__(self, feats: Tensor) -> None:
        self.batches += 1
        full = feats.shape[0] == self.batch_size
        with step_fusion(full):
            if not (self.graphs and full):
                self.body(feats.to(self.device, non_blocking=True))
                return
            if self.input is None:
                self.input = torch.zeros(feats.shape, device=self.device)
                self.input.copy_(feats, non_blocking=True)
                self._record()
            else:
                self.input.copy_(feats, non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.body(self.input)

    def _record(self) -> None:
        """Dry passes (on a side stream when recording), then record the step (runs nothing)."""
        capture = self.device.type == "cuda"
        side = torch.cuda.Stream(device=self.device) if capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(WARMUP_PASSES):
                self.body(self.input, dry=True)
        if side is None:
            return
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.body(self.input)
        except RuntimeError as error:
            if self.on_failure is not None:
                self.on_failure(f"CUDA graph recording failed ({str(error).splitlines()[0][:200]}); "
                                f"training goes on without it (--no_cuda_graphs skips the attempt)")
            return
        self.graph = graph

    def end_epoch(self) -> tuple[float, int, int]:
        if hasattr(self.optimizer, "found_inf"):  # an empty epoch never set it
            del self.optimizer.found_inf
        skipped = int(self._sums[1])
        totals = (float(self._sums[0]), self.batches - skipped, skipped)
        self._sums[0].zero_()
        self._sums[1].zero_()
        self.batches = 0
        return totals

    def close(self) -> None:
        super().close()
        if self.graph is not None:
            # A recorded step keeps a private memory pool that the allocator hands back only on
            # request; without this every task would leave its pool reserved.
            self.graph = None
            torch.cuda.empty_cache()


def make_step(strategy: Strategy, loss_fn: LossFn, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
              grad_clip: float, batch_size: int, device: torch.device,
              on_failure: Optional[Callable[[str], None]] = None) -> PlainStep:
    """The step ``strategy`` names, over ``params`` (made again when the trainable set changes)."""
    if not strategy.sync_free:
        return PlainStep(loss_fn, optimizer, params, grad_clip, batch_size, device)
    return SyncFreeStep(loss_fn, optimizer, params, grad_clip, batch_size, device, graphs=strategy.graphs,
                        on_failure=on_failure)
