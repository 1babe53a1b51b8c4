"""Compile the fused training step ahead, in a child process, while task 0 trains (``--compile_flow``).

Task 0 trains unfused; every later task trains through one compiled graph (frozen base). Compiled
in the run's own process, that graph stops training for ~10 s on a fresh machine. Instead, when
task 0 starts, a child process builds a replica of the flow (same settings and shapes; the values
do not matter), runs the same fused passes in the same order as the run will (a scoring pass, as
task 0's evaluation does before task 1 trains, then a training forward and backward of task 1)
and exits. Torch's compile caches on disk are then warm, and the run's own compile at task 1 loads
the kernels instead of generating them. The child shares nothing with the run but those caches,
so it cannot change the run's numbers; if it fails, the run compiles as before and says so once.

``python -m moleflow.trainer.precompile SPEC`` is the child (SPEC: JSON from ``start``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from moleflow.config.ablation import AblationConfig
from moleflow.models.fusion import fusion
from moleflow.models.loss import moleflow_loss, patch_nll
from moleflow.models.mole_nf import build_flow
from moleflow.trainer.precision import matmul_tf32


class AheadCompile:
    """The child process compiling ahead; ``wait`` before the run's first fused training step."""

    def __init__(self, process: subprocess.Popen, errors: Any) -> None:
        self.process = process
        self.errors = errors

    def wait(self, log: logging.Logger) -> None:
        code = self.process.wait()
        if code != 0:
            self.errors.seek(0)
            lines = [ln for ln in self.errors.read().decode(errors="replace").splitlines() if ln.strip()]
            last = lines[-1][:200] if lines else "no output"
            log.warning(f"--compile_flow: compiling ahead in a child process failed (exit {code}: {last}); "
                        f"the run compiles as it goes")
        self.errors.close()


def start(config: AblationConfig, batch_shape: tuple[int, ...], device: torch.device, tf32: bool) -> AheadCompile:
    """Start the child for training batches of ``batch_shape`` (B, H, W, D) on ``device``."""
    spec = {"config": config.to_dict(), "batch_shape": list(batch_shape), "device": str(device), "tf32": tf32}
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the moleflow package
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "moleflow.trainer.precompile", json.dumps(spec)],
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    atexit.register(_stop, process)  # a run that ends (or fails) before task 1 leaves no child behind
    return AheadCompile(process, errors)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def training_loss(model: torch.nn.Module, feats: torch.Tensor, task_id: int, config: AblationConfig) -> torch.Tensor:
    """The training loss of ``task_id`` on ``feats`` (the trainer's; the child must trace the same call)."""
    z, log_det = model(feats, task_id)
    return moleflow_loss(z, log_det, tail_weight=config.tail_weight, tail_ratio=config.tail_top_k_ratio,
                         lambda_logdet=config.lambda_logdet, tail_aware=config.use_tail_aware_loss)


def compile_passes(config: AblationConfig, batch_shape: tuple[int, ...], device: torch.device, tf32: bool) -> None:
    """Run, fused, a scoring pass (one expert, another batch size) and a task-1 training forward and
    backward of batch ``batch_shape`` on a replica of the flow: the passes the run compiles first."""
    batch, *grid = batch_shape
    model = build_flow(config, grid[-1]).to(device)
    model.add_task()
    model.add_task()
    with fusion(True), matmul_tf32(device, tf32):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            patch_nll(*model(torch.zeros(2 * batch + 1, *grid, device=device), 0))
        model.train()
        for p in model.task_parameters(1):
            p.requires_grad_(True)
        training_loss(model, torch.zeros(batch, *grid, device=device), 1, config).backward()


def main(argv: Optional[list[str]] = None) -> None:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    known = set(AblationConfig.__dataclass_fields__)
    config = AblationConfig(**{k: v for k, v in spec["config"].items() if k in known})
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    compile_passes(config, tuple(spec["batch_shape"]), device, bool(spec["tf32"]))


if __name__ == "__main__":
    main()
