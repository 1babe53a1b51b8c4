"""Compile the later tasks' fused training step in a background thread while task 0 trains.

Under ``--compile_flow`` task 0 trains unfused and every later task trains through one compiled
graph (frozen base), which the run would otherwise compile when task 1 starts (~10 s on an H200,
all of it training time). Instead, once task 0's first epoch has recorded its step, a thread runs
the same fused training pass (forward and backward of ``training_loss`` for task 1) on a replica
of the flow: a copy of the model taken before task 0, with two tasks added and the parameters
that task 1 trains set trainable. Torch's compiled code is cached per function, not per model, so
the run's own first step of task 1 finds it ready. Task 0 goes on meanwhile: its step is a
replayed CUDA graph, which needs the Python interpreter only briefly per step.

The thread cannot change the run's numbers: the replica shares no tensor with the model, its
input is zeros, it draws no random numbers (the replica's tasks are added before task 0 seeds
the generators) and it only reads global settings (TF32 is held constant while it runs). If it
fails, the run compiles at task 1 as before and says so once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moleflow.models import fusion

# While the thread compiles, the training thread asks for the interpreter a few times per step;
# with Python's default switch interval (5 ms) each request could wait that long.
_SWITCH_INTERVAL_S = 0.0005


class CompileAhead:
    """A replica of the flow whose task-1 training pass is compiled in a thread.

    Args:
        model: the run's flow before task 0 is added (copied; not touched).
        trainable: sets ``requires_grad`` on a model as the trainer does for a task, given
            ``(model, task_id)``.
        loss: the trainer's training loss ``(model, feats, task_id) -> scalar``.
        batch_shape: (B, H, W, D) of a full training batch.
        device: where the run trains.
        log: told once if compiling ahead failed.
    """

    def __init__(self, model: nn.Module, trainable: Callable[[nn.Module, int], object],
                 loss: Callable[[nn.Module, Tensor, int], Tensor], batch_shape: tuple[int, ...],
                 device: torch.device, log: logging.Logger) -> None:
        self.replica = copy.deepcopy(model)
        self.replica.add_task()
        self.replica.add_task()
        trainable(self.replica, 1)
        self.loss = loss
        self.batch_shape = batch_shape
        self.device = device
        self.log = log
        self.error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._interval = sys.getswitchinterval()

    def start(self) -> None:
        """Start compiling (call when nothing else records a CUDA graph: after the first epoch)."""
        sys.setswitchinterval(min(self._interval, _SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="moleflow-compile-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            on_side = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
            with fusion.fusion(True, self.log), on_side:
                self.replica.train()
                feats = torch.zeros(self.batch_shape, device=self.device)
                self.loss(self.replica, feats, 1).backward()
                del feats
            if side is not None:
                side.synchronize()
        except Exception as err:  # reported by wait(); the run compiles as it goes
            self.error = err
        finally:
            self.replica = None

    def wait(self) -> None:
        """Wait for the thread (if started) and restore the switch interval; one warning on failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        sys.setswitchinterval(self._interval)
        if self.error is not None:
            message = str(self.error).splitlines()[0][:200] if str(self.error) else ""
            self.log.warning(f"--compile_flow: compiling task 1's training step ahead failed "
                             f"({type(self.error).__name__}: {message}); it compiles when task 1 starts")
            self.error = None
