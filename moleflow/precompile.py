"""Compile the later tasks' fused training step in a child process while task 0 trains.

Under ``--compile_flow`` task 0 trains unfused and every later task through one graph (frozen base)
compiled for a full batch's exact shape; compiled in the run's own process, it would stall task 1. With
``compile_ahead`` (default) the runner starts ``python -m moleflow.precompile SPEC`` when task 0 starts: it
runs the trainer's own fused forward and backward of task 1 once on a two-task replica of the flow (same
settings and shapes), filling torch's on-disk compile caches (Inductor, AOTAutograd, Triton), which the
run's compile at task 1 then loads. The child shares only those caches, so it cannot change the run's
numbers; if it fails, the run compiles as it would have and says so in one warning.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Optional

import torch

from moleflow.build import build_flow, build_trainer
from moleflow.config.ablation import AblationConfig
from moleflow.models.fusion import active as fusion_active
from moleflow.models.fusion import fusion


class CompileAhead:
    """A run's compile-ahead child: started as task 0 trains (``--compile_flow``, CUDA), waited for before task 1.

    Attributes:
        report: what the child reported once the run waited for it: ``seconds`` from its launch to
            its end, ``gpu_peak_reserved_gib`` it held, ``waited_s`` the run waited for it; None
            before, if no child ran, or if it failed.
    """

    def __init__(self, config: AblationConfig, device: torch.device, log: logging.Logger) -> None:
        self.config, self.device, self.log = config, device, log
        self.report: Optional[dict] = None
        self._child: Optional[tuple[subprocess.Popen, IO[bytes], IO[bytes]]] = None

    def before_task(self, task_id: int, batch_shape: tuple[int, ...]) -> None:
        """Call before task ``task_id`` trains on full batches of ``batch_shape`` (B, H, W, D)."""
        if self._child is not None:
            self.wait()
        elif task_id == 0 and self.config.compile_ahead and fusion_active(self.device):
            self.start(batch_shape)

    def start(self, batch_shape: tuple[int, ...]) -> None:
        """Start the child for full training batches of ``batch_shape``."""
        spec = {"config": self.config.to_dict(), "batch_shape": list(batch_shape), "device": str(self.device),
                "launched": time.time()}
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the folder holding the moleflow package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        output, errors = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        process = subprocess.Popen([sys.executable, "-m", "moleflow.precompile", json.dumps(spec)],
                                   env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=errors)
        atexit.register(_stop, process)  # a run that ends (or fails) before task 1 leaves no child behind
        self._child = (process, output, errors)

    def wait(self) -> None:
        """Wait for the child; log what it did (one line) and keep its report (None if it failed)."""
        process, output, errors = self._child
        self._child = None
        started = time.perf_counter()
        code = process.wait()
        waited = time.perf_counter() - started
        output.seek(0)
        self.report = _last_report(output.read().decode(errors="replace")) if code == 0 else None
        if self.report is not None:
            self.report["waited_s"] = waited
            self.log.info(f"--compile_flow: a child process compiled the later tasks' training step while task 0 "
                          f"trained ({self.report['seconds']:.1f} s, GPU peak "
                          f"{self.report['gpu_peak_reserved_gib']:.2f} GiB); the run waited {waited:.1f} s for it")
        else:
            errors.seek(0)
            lines = [ln for ln in errors.read().decode(errors="replace").splitlines() if ln.strip()]
            last = "no report in its output" if code == 0 else lines[-1][:200] if lines else "no output"
            self.log.warning(f"--compile_flow: compiling ahead in a child process failed (exit {code}: {last}); "
                             f"the run compiles the training step itself (--no_compile_ahead skips the attempt)")
        output.close()
        errors.close()


def _last_report(output: str) -> Optional[dict]:
    """The child's report: the JSON object on the last line of its output (None if there is none)."""
    lines = output.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return report if isinstance(report, dict) and {"seconds", "gpu_peak_reserved_gib"} <= set(report) else None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def compile_training_step(config: AblationConfig, batch_shape: tuple[int, ...], device: torch.device) -> None:
    """The child's work: on a replica of the flow with two tasks, run task 1's fused training forward
    and backward once, as the run's trainer will (``MoLEContinualTrainer.trace_step``)."""
    model = build_flow(config, batch_shape[-1]).to(device)
    model.add_task()
    model.add_task()
    with fusion(True):
        build_trainer(config, model, device, logging.getLogger(__name__)).trace_step(1, batch_shape)


def main(argv: Optional[list[str]] = None) -> None:
    """The child: compile, then print its report (one JSON line) and exit."""
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    config = AblationConfig.from_dict(spec["config"])
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is not None:  # "cuda" alone: the current device
        torch.cuda.set_device(device)
    compile_training_step(config, tuple(spec["batch_shape"]), device)
    peak = torch.cuda.max_memory_reserved(device) / 1024**3 if device.type == "cuda" else 0.0
    seconds = time.time() - spec["launched"]  # from its launch, the interpreter's start included
    print(json.dumps({"seconds": seconds, "gpu_peak_reserved_gib": peak}), flush=True)


if __name__ == "__main__":
    main()
