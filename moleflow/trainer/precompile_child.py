"""The compile-ahead child: ``python -m moleflow.trainer.precompile_child SPEC``.

Started by ``precompile.start`` (SPEC: the JSON it writes). On a replica of the flow it runs the
trainer's own fused training step of task 1 once, so that torch's on-disk compile caches hold that
graph, prints its report (one JSON line) and exits. It lives apart from ``precompile.py`` so that the
trainer, which launches the child, does not import a module that imports the trainer.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional

import torch

from moleflow.config.ablation import AblationConfig
from moleflow.models.fusion import fusion
from moleflow.models.mole_nf import build_flow
from moleflow.models.routing import PrototypeRouter
from moleflow.trainer.continual_trainer import MoLEContinualTrainer


def compile_training_step(config: AblationConfig, batch_shape: tuple[int, ...], device: torch.device,
                          tf32: bool) -> None:
    """On a replica of the flow with two tasks, run task 1's fused training forward and backward
    once, as the trainer will (``MoLEContinualTrainer.trace_step``)."""
    model = build_flow(config, batch_shape[-1]).to(device)
    model.add_task()
    model.add_task()
    trainer = MoLEContinualTrainer(config, model, PrototypeRouter(), device, logging.getLogger(__name__),
                                   progress=False, tf32=tf32)
    with fusion(True):
        trainer.trace_step(1, batch_shape)


def main(argv: Optional[list[str]] = None) -> None:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    config = AblationConfig.from_dict(spec["config"])
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is not None:  # "cuda" alone: the current device
        torch.cuda.set_device(device)
    compile_training_step(config, tuple(spec["batch_shape"]), device, bool(spec["tf32"]))
    peak = torch.cuda.max_memory_reserved(device) / 1024**3 if device.type == "cuda" else 0.0
    seconds = time.time() - spec["launched"]  # from its launch, the interpreter's start included
    print(json.dumps({"seconds": seconds, "gpu_peak_reserved_gib": peak}), flush=True)


if __name__ == "__main__":
    main()
