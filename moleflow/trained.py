"""A trained run loaded back from its folder for use on new images (predict, the Python API, export,
re-evaluation): its settings, backbone, flow, router, patch memory, thresholds and router limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moleflow.build import build_backbone, build_flow, build_router, resolve_device, score_settings
from moleflow.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, saved_config
from moleflow.config.ablation import AblationConfig, ConfigError
from moleflow.evaluation.calibration import Calibration
from moleflow.evaluation.evaluator import ScoreSettings
from moleflow.extractors import BackboneError, FeatureExtractor
from moleflow.models.memory import PatchMemory
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.models.routing import PrototypeRouter

# What loading a run folder raises for a user's mistake (each a one-line message).
LOAD_ERRORS = (CheckpointError, ConfigError, BackboneError)


@dataclass
class TrainedRun:
    """Everything a trained run scores new images with.

    Attributes:
        run_dir: the experiment folder.
        config: its settings (``config`` of the checkpoint).
        tasks: the trained tasks' classes (a run stopped early has fewer than it planned).
        extractor, model, router, memory: the frozen backbone, the flow (eval mode), the task
            prototypes, the patch memories (None when the score is the flow's alone).
        calibration: per task, threshold and router limit (empty for a run written before them).
        settings: how images are scored (``ScoreSettings`` of ``config``).
        device: where it all runs.
    """

    run_dir: Path
    config: AblationConfig
    tasks: list[list[str]]
    extractor: FeatureExtractor
    model: MoLESpatialAwareNF
    router: PrototypeRouter
    memory: Optional[PatchMemory]
    calibration: Calibration
    settings: ScoreSettings
    device: torch.device

    @property
    def class_names(self) -> list[str]:
        """One name per task: its class, or its classes joined by '+'."""
        return ["+".join(t) for t in self.tasks]

    def thresholds(self) -> list[Optional[float]]:
        """The threshold of every task (None where it has none)."""
        found = self.calibration.thresholds()
        return [found[t] if t < len(found) else None for t in range(len(self.tasks))]

    def router_limits(self) -> list[Optional[float]]:
        """The router limit of every task (None where it has none)."""
        found = self.calibration.router_limits()
        return [found[t] if t < len(found) else None for t in range(len(self.tasks))]


def read_checkpoint(run_dir: Path) -> dict:
    """The checkpoint of a run folder; a folder without one is a one-line error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass an experiment folder under --log_dir "
                              "(e.g. logs/moleflow_<time>)")
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise CheckpointError(f"no {CHECKPOINT_NAME} in {run_dir}; pass an experiment folder that finished at least "
                              "one task (e.g. logs/moleflow_<time>)")
    return load_checkpoint(run_dir / CHECKPOINT_NAME)


def load_trained(run_dir: Path | str, device: str = "auto") -> TrainedRun:
    """Load a run folder's checkpoint and build its parts on ``device``.

    Args:
        run_dir: the experiment folder (with ``checkpoint.pt``).
        device: auto, cpu, cuda or cuda:N.

    Raises:
        CheckpointError: no folder, no checkpoint, or a checkpoint that cannot be read.
    """
    run_dir = Path(run_dir)
    ckpt = read_checkpoint(run_dir)
    config = saved_config(ckpt)
    where = resolve_device(device)
    done = int(ckpt["tasks_done"])
    if done < 1:
        raise CheckpointError(f"{run_dir / CHECKPOINT_NAME} holds no trained task; let the run finish a task first")
    extractor = build_backbone(config, where)
    model = build_flow(config, extractor.feature_dim)
    for _ in range(done):
        model.add_task()
    model.load_state_dict(ckpt["model"])
    model.to(where).eval()
    router = PrototypeRouter.from_state(ckpt["router"]) if ckpt.get("router") else build_router(config)
    memory = PatchMemory.from_state(ckpt["memory"]) if config.anomaly_score != "flow" else None
    return TrainedRun(run_dir=run_dir, config=config, tasks=[list(t) for t in ckpt["tasks"][:done]],
                      extractor=extractor, model=model, router=router, memory=memory,
                      calibration=Calibration.from_state(ckpt.get("calibration")), settings=score_settings(config),
                      device=where)
