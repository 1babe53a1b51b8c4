"""Several processes under ``torchrun``: which process this is, and the few collectives a run needs.

:func:`start` joins torchrun's processes into one group (NCCL, ``cuda:LOCAL_RANK``; gloo on the CPU).
Each process extracts and scores a block of the images (:func:`by_rows`, :func:`shard_images`) and all
get every row back, so router, memory, calibration and metrics see the same values everywhere; training
splits each batch (``moleflow.trainer.ddp``). Process 0 alone writes files (:func:`on_writer`).
Without ``WORLD_SIZE`` or with ``WORLD_SIZE=1`` every helper is the identity: exactly the plain run.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for the other processes


class DistributedError(RuntimeError):
    """The process group cannot start, or process 0 failed at a step the others wait for."""


@dataclass(frozen=True)
class World:
    """This process among the run's processes.

    Attributes:
        rank: 0 .. size - 1; process 0 writes the experiment folder.
        size: the number of processes (1: a plain run).
        backend: 'nccl', 'gloo', or 'none' for a single process.
        device: where the tensors of collectives live.
    """

    rank: int = 0
    size: int = 1
    backend: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """More than one process: the collectives really run."""
        return self.size > 1

    @property
    def writer(self) -> bool:
        """This process writes the experiment folder and logs to the console."""
        return self.rank == 0


_world = World()


def world() -> World:
    """The current world (a single process until :func:`start` joined a group)."""
    return _world


def start(device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return this process's device:
    ``cuda:LOCAL_RANK`` on CUDA (backend NCCL), the CPU with gloo; ``device`` itself when there is
    one process."""
    global _world
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = max(1, int(value))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={value!r} is not a number; start the run with torchrun "
                               f"--nproc_per_node N or unset WORLD_SIZE") from None
    if size == 1:
        return device
    if _world.active:
        return _world.device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(f"process {local} on this machine has no GPU ({torch.cuda.device_count()} "
                                   f"visible); use --nproc_per_node <= the GPU count")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"cannot join the torchrun group ({str(err).splitlines()[0]}); start the run "
                               f"with torchrun --nproc_per_node N run_moleflow.py ...") from err
    atexit.register(_stop)
    _world = World(rank=dist.get_rank(), size=dist.get_world_size(), backend=backend, device=device)
    return device


def _stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- collectives
def shard_range(n: int) -> tuple[int, int]:
    """This process's block [lo, hi) of ``n`` rows: contiguous, in rank order, sizes differing by at
    most one (a block may be empty when ``n`` < the process count)."""
    w = _world
    base, extra = divmod(n, w.size)
    lo = w.rank * base + min(w.rank, extra)
    return lo, lo + base + (1 if w.rank < extra else 0)


def gather_rows(part: Tensor) -> Tensor:
    """The processes' ``part`` tensors joined along dim 0 in rank order, on every process (on the
    device ``part`` is on). Parts may differ in length; their other dimensions must agree."""
    w = _world
    if not w.active:
        return part
    local = part.to(w.device)
    sizes = [torch.zeros(1, dtype=torch.long, device=w.device) for _ in range(w.size)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=w.device))
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=w.device)
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:c] for p, c in zip(pieces, counts)]).to(part.device)


def _each_tensor(value: T, fn: Callable[[Tensor], Tensor]) -> T:
    """``fn(value)`` for a tensor; for a dataclass, ``fn`` applied to each tensor field (others kept)."""
    if isinstance(value, Tensor):
        return fn(value)
    return dataclasses.replace(value, **{f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)
                                         if isinstance(getattr(value, f.name), Tensor)})


def by_rows(fn: Callable[[int, int], T], n: int) -> T:
    """``fn(0, n)`` computed in blocks: each process calls ``fn(lo, hi)`` for its block of the ``n``
    rows and every process gets all rows in order. ``fn`` returns a tensor or a dataclass of tensors
    with one row per input row. A process with an empty block computes row 0 and drops it (so its
    part has the right shape and dtype)."""
    if not _world.active:
        return fn(0, n)
    lo, hi = shard_range(n)
    part = fn(lo, hi) if hi > lo else _each_tensor(fn(0, min(1, n)), lambda t: t[:0])
    return _each_tensor(part, gather_rows)


def all_sum(value: Tensor) -> Tensor:
    """The sum of ``value`` over the processes (a new tensor, on ``value``'s device)."""
    if not _world.active:
        return value
    total = value.detach().clone().to(_world.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def on_writer(fn: Callable[[], T]) -> T:
    """Process 0 runs ``fn`` as a world of one and every process returns its result (it must pickle).
    If ``fn`` raises on process 0, the error is raised there and the others raise a
    :class:`DistributedError` with its message, so all of them stop with the same line, not a hang."""
    global _world
    w = _world
    if not w.active:
        return fn()
    box: list[Any] = [None, None]
    error = None
    if w.writer:
        _world = World(device=w.device)  # alone: a collective inside would wait for processes that never join
        try:
            box[0] = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below after the others are told
            error = err
            box[1] = f"{err}" or type(err).__name__
        finally:
            _world = w
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise DistributedError(f"{box[1]} (on process 0)")
    return box[0]


# ---------------------------------------------------------------------------------- datasets, logs
class DatasetShard(torch.utils.data.Dataset):
    """Items ``lo .. hi - 1`` of an ``AnomalyDataset`` (decoded images stay in the parent's cache); other
    attributes (``augment``, ...) are the parent's."""

    def __init__(self, dataset: Any, lo: int, hi: int) -> None:
        self.dataset, self.lo, self.hi = dataset, lo, hi
        self.samples = list(dataset.samples[lo:hi]) if hasattr(dataset, "samples") else None

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.lo + index]

    def decoded(self, index: int) -> Any:
        return self.dataset.decoded(self.lo + index)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no parent to ask
            raise AttributeError(name)
        return getattr(self.dataset, name)


def shard_images(method: Callable[..., T]) -> Callable[..., T]:
    """Decorates ``method(self, dataset, ...)`` that returns a dataclass of tensors with one row per
    image (a ``FeatureSet``): under torchrun each process runs it on its block of the dataset's
    images and every process gets the rows of all images in order; alone, the method as it is."""
    @functools.wraps(method)
    def sharded(self: Any, dataset: Any, *args: Any, **kwargs: Any) -> T:
        if not _world.active:
            return method(self, dataset, *args, **kwargs)
        return by_rows(lambda lo, hi: method(self, DatasetShard(dataset, lo, hi), *args, **kwargs), len(dataset))
    return sharded


def console_logger() -> logging.Logger:
    """The logger of a process other than 0: no file, warnings and errors on stderr marked with its
    rank, info lines dropped."""
    logger = logging.getLogger(f"moleflow.rank{_world.rank}")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[process {_world.rank}] %(message)s"))
        logger.addHandler(handler)
    return logger


def describe() -> dict[str, Any]:
    """config.json's record of the world: process count and backend."""
    return {"world_size": _world.size, "backend": _world.backend}
