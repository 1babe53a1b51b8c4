"""The Python API: ``model = moleflow.load("logs/<run>")``, then ``model.predict(images_or_paths)``.

```python
import moleflow
model = moleflow.load("logs/moleflow_20261202_120000")
for p in model.predict(["part_001.png", "line/"]):        # files, folders, PIL images, uint8 arrays
    print(p.path, p.class_name, p.image_score, p.is_anomalous, p.anomaly_map.shape)
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from torch import Tensor

from moleflow.predictor import BatchScores, ImageInput, Prediction, Predictor, expand_inputs
from moleflow.trained import TrainedRun, load_trained


class Model:
    """A trained run, ready for new images.

    Attributes:
        trained: its parts (settings, backbone, flow, router, memory, thresholds).
        classes: one name per task (its class, or its classes joined by '+').
        thresholds: the decision threshold of each task (None: the run has none).
    """

    def __init__(self, trained: TrainedRun, batch_size: Optional[int] = None) -> None:
        self.trained = trained
        self.predictor = Predictor(trained, batch_size=batch_size)

    @property
    def classes(self) -> list[str]:
        return self.trained.class_names

    @property
    def thresholds(self) -> list[Optional[float]]:
        return self.trained.thresholds()

    @property
    def img_size(self) -> int:
        return self.trained.config.img_size

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], maps: bool = True,
                task: Optional[int] = None) -> list[Prediction]:
        """One :class:`Prediction` per image (score, class, decision, map at the image's resolution).

        Args:
            images: one or several of: a file path, a folder (its images, recursively), a glob
                pattern, a PIL image, a uint8 array (H, W) or (H, W, 3).
            maps: also return each image's anomaly map (``Prediction.anomaly_map``).
            task: score with this task's expert instead of routing.
        """
        items = [images] if isinstance(images, (str, Path)) or not isinstance(images, Sequence) else list(images)
        expanded: list[ImageInput] = []
        for item in items:
            expanded += expand_inputs([item]) if isinstance(item, (str, Path)) else [item]
        predictor = self.predictor if task is None else Predictor(self.trained, self.predictor.batch_size, task)
        return list(predictor.predict(expanded, maps=maps))

    def score_tensors(self, images: Tensor) -> BatchScores:
        """(B, 3, S, S) images already decoded and ImageNet-normalised -> their scores on the run's
        device (batched; ``Predictor.score``)."""
        return self.predictor.score(images)


def load(run_dir: Union[str, Path], device: str = "auto", batch_size: Optional[int] = None) -> Model:
    """Load a trained run's folder (``logs/<run>``, with ``checkpoint.pt``) on ``device`` (auto, cpu,
    cuda, cuda:N)."""
    return Model(load_trained(run_dir, device=device), batch_size=batch_size)
