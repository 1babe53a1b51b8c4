"""Optional kernel fusion of the flow's element-wise work on CUDA (``--compile_flow``).

Between its matrix products the flow runs many small element-wise passes over (B, H, W, D)
tensors (soft clamp, exp, affine update, concatenation, permutation, log-det sum). On a GPU each
is a separate read and write of the whole tensor. ``fusable`` marks such a pure function: while
fusion is on and its first argument is a CUDA tensor, it runs through ``torch.compile`` (one
compiled kernel set per shape and autograd mode, shared by every block and every task, since the
task's parameters are arguments, not constants); otherwise, and always on the CPU, the plain
function runs. The compiled kernels round a little differently from the eager ones (their tanh
and exp), so results are equal to float tolerance, not bit for bit.

Batch sizes: scoring sees many, so its graphs take the batch size as a symbol (torch's automatic
dynamic shapes). A training step always has the same shape, and a graph compiled for it runs faster
(bias-gradient sums split well only for a known size): the trainer runs full batches inside
``static_shapes()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar

import torch
from torch._dynamo.exc import TorchDynamoException

F = TypeVar("F", bound=Callable)

# Where fusion applies and how (tests trace on the CPU with a counting backend).
# Inductor's layout optimisation is off: for exact shapes it laid each coupling block's input out
# channel-major for the context conv (strided reads, two copies back to rows per block); off, tensors
# keep their eager layout (faster; docs/performance.md).
FUSED_DEVICES: tuple[str, ...] = ("cuda",)
COMPILE_OPTIONS: dict = {"dynamic": None, "options": {"layout_optimization": False}}

# Each fusable function compiles once per input shape class and autograd mode (training with and
# without trainable shared weights, scoring with one expert or one per image, full and last
# batches): more variants than torch.compile keeps by default (8) before it falls back to eager.
_RECOMPILE_LIMIT = 64


@dataclass
class _State:
    """What the contexts below set for the code inside them (and put back on exit)."""

    enabled: bool = False
    static: bool = False
    log: Optional[logging.Logger] = None


_state = _State()


@contextlib.contextmanager
def _set(**changes: object) -> Iterator[None]:
    previous = dataclasses.replace(_state)
    for name, value in changes.items():
        setattr(_state, name, value)
    try:
        yield
    finally:
        for name in changes:
            setattr(_state, name, getattr(previous, name))


@contextlib.contextmanager
def fusion(enabled: bool, log: Optional[logging.Logger] = None) -> Iterator[None]:
    """Fusion on or off inside the block (on: torch's recompile limit at least ``_RECOMPILE_LIMIT``); both
    are as before on exit. ``log`` gets the warning when a function cannot be compiled (it then runs eagerly)."""
    with contextlib.ExitStack() as stack:
        if enabled:
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
            stack.enter_context(config.patch(**{name: max(getattr(config, name), _RECOMPILE_LIMIT)}))
        stack.enter_context(_set(enabled=enabled, log=log))
        yield


def active(device: torch.device) -> bool:
    """Whether fusable functions run compiled for tensors on ``device`` right now."""
    return _state.enabled and device.type in FUSED_DEVICES


@contextlib.contextmanager
def paused(pause: bool = True) -> Iterator[None]:
    """Fusion off inside the block when ``pause`` (the compile-failure log is kept)."""
    with _set(enabled=False) if pause else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def static_shapes(enabled: bool = True) -> Iterator[None]:
    """Inside the block (when ``enabled``), fused calls compile for the exact shapes of their tensor
    arguments, even where earlier calls made a size symbolic; a graph compiled so is reused by any
    later call of the same shapes and autograd mode."""
    with _set(static=enabled):
        yield


def fusable(fn: F) -> F:
    """Run ``fn`` compiled on CUDA inputs while fusion is on, plain otherwise.

    If torch.compile fails for it (no working compiler toolchain, an unsupported construct), the
    function runs plainly from then on and the failure is logged once: the run goes on, slower.
    """
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not active(args[0].device):
            return fn(*args, **kwargs)
        if torch.compiler.is_compiling():
            # Called from a fusable function being traced: inline the plain function (going through
            # ``compiled`` here would make the outer graph guard on that list, and compile twice).
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, **COMPILE_OPTIONS))
        if _state.static:
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, torch.Tensor):
                    torch._dynamo.mark_static(arg)
        try:
            return compiled[0](*args, **kwargs)
        except TorchDynamoException as err:
            compiled[0] = fn
            message = (f"--compile_flow: {fn.__name__} could not be compiled ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:200] if str(err) else ''}); it runs without fusion")
            (_state.log or logging.getLogger(__name__)).warning(message)
            return fn(*args, **kwargs)

    _compiled_lists.append(compiled)
    return run  # type: ignore[return-value]


_compiled_lists: list[list[Callable]] = []


def reset_compiled() -> None:
    """Forget every compiled version (the next fused call compiles again with ``COMPILE_OPTIONS``)."""
    for compiled in _compiled_lists:
        compiled.clear()
    torch._dynamo.reset()
