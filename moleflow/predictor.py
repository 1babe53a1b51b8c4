"""A trained run on new images: route each image to an expert, score it, decide, and give its anomaly
map at the image's own resolution.

The scoring is the evaluation's own (``evaluation.evaluator.score_features``, files read by the same
``AnomalyDataset`` transform), so a test image gets the evaluation's score (to float tolerance: other
batching, other summation order). An image farther from its routed task than that task's router limit
(what its own images reach, ``evaluation/calibration.py``) is flagged ``unknown_class``: its score
(against the nearest expert) is reported, but no decision is made.
"""

from __future__ import annotations

import glob
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from moleflow.build import build_dataset
from moleflow.data import IMAGENET_MEAN, IMAGENET_STD
from moleflow.data.base import IMAGE_EXTENSIONS, DataError, Sample, one_line
from moleflow.data.dataset import resize_crop
from moleflow.evaluation.anomaly_map import anomaly_maps
from moleflow.evaluation.evaluator import score_batch, score_features
from moleflow.evaluation.image_maps import map_to_image
from moleflow.extractors.features import decode_threads
from moleflow.models.fusion import fusion
from moleflow.trained import TrainedRun
from moleflow.utils.precision import matmul_tf32

ImageInput = Union[str, Path, Image.Image, np.ndarray]


@dataclass
class Prediction:
    """What predict says about one input.

    Attributes:
        path: the file (or ``<image N>`` for an image passed in memory).
        width, height: the input's size in pixels (0 when it could not be read).
        routed_task: the expert it was scored with (None: not read).
        class_name: that task's class (its classes joined by '+').
        router_distance: its router distance to that task's prototype.
        router_limit: the task's unknown-class limit (None: none stored).
        unknown_class: farther from every known class than that class's own images reach.
        image_score: its image anomaly score (NaN: not read).
        threshold: the task's threshold (None: the run has none, ``--val_fraction 0``).
        is_anomalous: score > threshold; None without a threshold or for an unknown class.
        anomaly_map: ``(height, width)`` float32 map (NaN where not scored), when asked.
        error: why the input could not be read ('' when it was).
    """

    path: str
    width: int = 0
    height: int = 0
    routed_task: Optional[int] = None
    class_name: str = ""
    router_distance: float = math.nan
    router_limit: Optional[float] = None
    unknown_class: bool = False
    image_score: float = math.nan
    threshold: Optional[float] = None
    is_anomalous: Optional[bool] = None
    anomaly_map: Optional[np.ndarray] = None
    error: str = ""


@dataclass
class BatchScores:
    """Scores of a batch of decoded images, on the run's device.

    Attributes:
        tasks: (B,) routed (or given) task. distances: (B,) router distance to it.
        image_scores: (B,). maps: (B, S, S) anomaly maps of the model's input.
        unknown: (B,) bool, beyond the task's router limit. anomalous: (B,) bool, score > threshold
            (False where the task has no threshold).
    """

    tasks: Tensor
    distances: Tensor
    image_scores: Tensor
    maps: Tensor
    unknown: Tensor
    anomalous: Tensor


def expand_inputs(inputs: Iterable[Union[str, Path]]) -> list[str]:
    """Files as given; folders -> their image files (recursively, sorted); patterns with ``*?[`` ->
    their matches (sorted). A name that is none of these is kept (its row says it is missing)."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                          and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif not path.exists() and any(c in str(item) for c in "*?["):
            out += sorted(p for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
        else:
            out.append(str(item))
    return out


class Predictor:
    """Scores images with a :class:`TrainedRun`.

    Args:
        trained: the loaded run.
        batch_size: images per pass (default: the evaluation's scoring batch).
        task: score every image with this task's expert instead of routing it.
        fuse: run the flow's element-wise work compiled (``--compile_flow``; CUDA only); default: as
            the run was trained (its first batches then compile).
    """

    def __init__(self, trained: TrainedRun, batch_size: Optional[int] = None, task: Optional[int] = None,
                 fuse: Optional[bool] = None) -> None:
        if task is not None and not 0 <= task < len(trained.tasks):
            raise ValueError(f"--task {task}: the run has tasks 0..{len(trained.tasks) - 1}")
        self.trained = trained
        self.task = task
        self.fuse = (trained.config.compile_flow if fuse is None else fuse) and trained.device.type == "cuda"
        self.batch_size = batch_size or score_batch(trained.settings, trained.device)
        device = trained.device
        self._thresholds = torch.tensor([math.nan if t is None else t for t in trained.thresholds()], device=device)
        self._limits = torch.tensor([math.inf if t is None else t for t in trained.router_limits()], device=device)
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @torch.no_grad()
    def score(self, images: Tensor) -> BatchScores:
        """(B, 3, S, S) ImageNet-normalised images (any device) -> their scores on the run's device.

        Batched end to end (backbone, router, routed flow, memory, maps), no per-image host wait."""
        run = self.trained
        device = run.device
        feats = run.extractor(images.to(device, non_blocking=True))
        with matmul_tf32(device, False):  # routing in full float32, as the evaluation routes
            squared = run.router.distances(feats.mean(dim=(1, 2)))
        tasks = squared.argmin(dim=1) if self.task is None else torch.full_like(squared[:, 0], self.task).long()
        distances = squared.gather(1, tasks[:, None]).squeeze(1).clamp_min(0.0).sqrt()
        with fusion(self.fuse):
            patch, image = score_features(run.model, run.memory, feats, tasks, run.settings, device)
        maps = anomaly_maps(patch, out_size=tuple(images.shape[-2:]), sigma=run.settings.anomaly_map_sigma)
        on = image.device
        threshold = self._thresholds.to(on)[tasks.to(on)]
        return BatchScores(tasks=tasks, distances=distances, image_scores=image, maps=maps,
                           unknown=distances > self._limits[tasks], anomalous=image > threshold)

    def image_tensor(self, image: Union[Image.Image, np.ndarray]) -> Tensor:
        """An image in memory -> the model's (3, S, S) input, by the transform files get
        (``--resize_mode``, bilinear, ImageNet normalisation); uint8 arrays (H, W) or (H, W, 3)."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise DataError(f"image array of dtype {image.dtype} and shape {image.shape}: pass uint8 (H, W) or "
                                "(H, W, 3)")
            image = Image.fromarray(image)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        cfg = self.trained.config
        square = resize_crop(rgb, cfg.img_size, Image.Resampling.BILINEAR, mode=cfg.resize_mode)
        t = torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return (t.float().div_(255.0) - self._mean) / self._std

    def predict(self, items: Sequence[ImageInput], maps: bool = True, progress: bool = False) -> Iterator[Prediction]:
        """One :class:`Prediction` per item, in order (files decoded on a thread pool, one batch ahead)."""
        chunks = [list(range(i, min(i + self.batch_size, len(items)))) for i in range(0, len(items), self.batch_size)]
        bar = tqdm(total=len(items), desc="predict", disable=not progress)
        with ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="predict") as pool:
            pending: Optional[list[Future]] = self._submit(pool, items, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                loaded = [f.result() for f in pending]
                pending = self._submit(pool, items, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield from self._finish(loaded, maps)
                bar.update(len(loaded))
        bar.close()

    def _submit(self, pool: ThreadPoolExecutor, items: Sequence[ImageInput], indices: list[int]) -> list[Future]:
        paths = [i for i in indices if isinstance(items[i], (str, Path))]
        dataset = build_dataset(self.trained.config, [Sample(Path(items[i]), 0, None, "", "") for i in paths])
        where = {i: n for n, i in enumerate(paths)}
        return [pool.submit(self._load, items[i], dataset, where.get(i), i) for i in indices]

    def _load(self, item: ImageInput, dataset, index: Optional[int], position: int) -> tuple:
        """(Prediction with path and size, input tensor or None)."""
        name = str(item) if index is not None else f"<image {position}>"
        try:
            if index is None:
                size = item.size if isinstance(item, Image.Image) else (item.shape[1], item.shape[0])
                return Prediction(name, int(size[0]), int(size[1])), self.image_tensor(item)
            if not Path(item).is_file():
                raise DataError(f"no such file {item}; check the path")
            with Image.open(item) as opened:
                width, height = opened.size
            return Prediction(name, width, height), dataset[index]["image"]
        except DataError as error:
            return Prediction(name, error=str(error)), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return Prediction(name, error=f"cannot read image {item}: {one_line(error)}; replace or remove the file"), None

    def _finish(self, loaded: list[tuple], with_maps: bool) -> Iterator[Prediction]:
        good = [n for n, (_, tensor) in enumerate(loaded) if tensor is not None]
        if good:
            scores = self.score(torch.stack([loaded[n][1] for n in good]))
            tasks, distances = scores.tasks.tolist(), scores.distances.tolist()
            values, unknown, anomalous = scores.image_scores.tolist(), scores.unknown.tolist(), scores.anomalous.tolist()
        thresholds, limits, names = self.trained.thresholds(), self.trained.router_limits(), self.trained.class_names
        row = {n: k for k, n in enumerate(good)}
        for n, (prediction, _) in enumerate(loaded):
            if n in row:
                k, task = row[n], tasks[row[n]]
                prediction.routed_task, prediction.class_name = task, names[task]
                prediction.router_distance, prediction.router_limit = distances[k], limits[task]
                prediction.image_score, prediction.threshold = values[k], thresholds[task]
                prediction.unknown_class = bool(unknown[k])
                decided = thresholds[task] is not None and not prediction.unknown_class
                prediction.is_anomalous = bool(anomalous[k]) if decided else None
                if with_maps:
                    full = map_to_image(scores.maps[k], prediction.width, prediction.height, self.trained.config.resize_mode)
                    prediction.anomaly_map = full.cpu().numpy()
            yield prediction
