"""Predict throughput after the last task, with the run's own parts (``moleflow.predictor.Predictor``,
the path of ``python -m moleflow.predict`` and ``moleflow.load(...).predict``):

- from decoded tensors: host images ``(B, 3, S, S)`` -> ``Predictor.score`` (everything on the
  device, batched; the image scores reach the host once, at the end);
- from files: image paths -> ``Predictor.predict`` (maps at each image's own resolution, on the
  host; nothing written).

Each is timed on a second pass over the same images, after an untimed first pass.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from moleflow.benchmark.limits import images_per_second
from moleflow.predictor import Predictor
from moleflow.trained import TrainedRun


def trained_from_run(run: Any) -> TrainedRun:
    """The parts of a finished ``moleflow.runner.Run`` as a :class:`TrainedRun` (nothing re-loaded)."""
    return TrainedRun(run_dir=run.exp_dir, config=run.config, tasks=run.tasks, extractor=run.extractor,
                      model=run.model.eval(), router=run.router, memory=run.memory, calibration=run.calibration,
                      settings=run.score, device=run.device)


@torch.no_grad()
def decoded_images_per_s(predictor: Predictor, images: Tensor, batch: int) -> float:
    """Images/s of ``Predictor.score`` over ``images`` (host tensors) in batches of ``batch``."""
    def one_pass() -> Tensor:
        scores = [predictor.score(images[s:s + batch]).image_scores for s in range(0, len(images), batch)]
        return torch.cat(scores).cpu()

    return images_per_second(one_pass, len(images), predictor.trained.device, warmup=1, iters=1)


def files_images_per_s(predictor: Predictor, paths: list[str]) -> float:
    """Images/s of ``Predictor.predict`` over ``paths`` with maps at each image's resolution."""
    for _ in predictor.predict(paths):
        pass
    started = time.perf_counter()
    count = sum(1 for _ in predictor.predict(paths))
    return count / (time.perf_counter() - started)


def predict_throughput(run: Any, images: Tensor, paths: list[str], batch: int) -> dict[str, Any]:
    """Both figures after the run's last task (JSON-ready)."""
    predictor = Predictor(trained_from_run(run), batch_size=batch)
    return {"tasks": len(run.tasks), "batch": batch, "images_decoded": len(images), "images_files": len(paths),
            "decoded_images_per_s": decoded_images_per_s(predictor, images, batch),
            "files_images_per_s": files_images_per_s(predictor, paths)}
