"""Compile the later tasks' fused training step in a child process while task 0 trains.

Under ``--compile_flow`` task 0 trains unfused, and every later task trains through one graph
(frozen base) compiled for the exact shape of a full batch. Compiled in the run's own process, at
the start of task 1, that graph stops training while it compiles. With
``compile_ahead`` (default) the trainer starts a child process when task 0 starts: it builds a
replica of the flow with two tasks (same settings and shapes; the values do not matter), runs the
trainer's own fused forward and backward of task 1 once, and exits. torch's on-disk compile caches
(Inductor's FX graph and AOTAutograd caches, Triton's kernels) then hold that graph, and the run's
compile at task 1 loads it instead of generating it. The child shares nothing with the run but
those caches, so it cannot change the run's numbers; if it fails, the run compiles as it would
have and says so in one warning line.

This module launches the child and reads its report; ``python -m moleflow.trainer.precompile_child SPEC``
(``precompile_child.py``) is the child (SPEC: the JSON written by ``start``).
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

from moleflow.config.ablation import AblationConfig


class AheadCompile:
    """The running child; ``wait`` for it before the run's first fused training step."""

    def __init__(self, process: subprocess.Popen, output: IO[bytes], errors: IO[bytes]) -> None:
        self.process = process
        self.output = output
        self.errors = errors

    def wait(self, log: logging.Logger) -> Optional[dict]:
        """Wait for the child; log what it did (one line) and return its report (None if it failed).

        The report: ``seconds`` from the child's launch to its end, ``gpu_peak_reserved_gib`` it
        held, ``waited_s`` the run waited for it here."""
        started = time.perf_counter()
        code = self.process.wait()
        waited = time.perf_counter() - started
        self.output.seek(0)
        report = _last_report(self.output.read().decode(errors="replace")) if code == 0 else None
        if report is not None:
            report["waited_s"] = waited
            log.info(f"--compile_flow: a child process compiled the later tasks' training step while task 0 "
                     f"trained ({report['seconds']:.1f} s, GPU peak {report['gpu_peak_reserved_gib']:.2f} "
                     f"GiB); the run waited {waited:.1f} s for it")
        else:
            self.errors.seek(0)
            lines = [ln for ln in self.errors.read().decode(errors="replace").splitlines() if ln.strip()]
            last = "no report in its output" if code == 0 else lines[-1][:200] if lines else "no output"
            log.warning(f"--compile_flow: compiling ahead in a child process failed (exit {code}: {last}); "
                        f"the run compiles the training step itself (--no_compile_ahead skips the attempt)")
        self.output.close()
        self.errors.close()
        return report


def _last_report(output: str) -> Optional[dict]:
    """The child's report: the JSON object on the last line of its output (None if there is none)."""
    lines = output.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return report if isinstance(report, dict) and {"seconds", "gpu_peak_reserved_gib"} <= set(report) else None


def start(config: AblationConfig, batch_shape: tuple[int, ...], device: torch.device, tf32: bool) -> AheadCompile:
    """Start the child for full training batches of ``batch_shape`` (B, H, W, D) on ``device``."""
    spec = {"config": config.to_dict(), "batch_shape": list(batch_shape), "device": str(device), "tf32": tf32,
            "launched": time.time()}
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the moleflow package
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    output, errors = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "moleflow.trainer.precompile_child", json.dumps(spec)],
                               env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=errors)
    atexit.register(_stop, process)  # a run that ends (or fails) before task 1 leaves no child behind
    return AheadCompile(process, output, errors)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
