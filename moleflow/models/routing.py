"""Prototype router: one Gaussian prototype per task, test images go to the nearest task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def ledoit_wolf(features: Tensor) -> tuple[Tensor, float]:
    """Ledoit-Wolf shrinkage covariance of (N, D) samples (mean removed), in their dtype and device.

    Sigma = (1 - s) S + s mu I, with S the empirical covariance (divided by N), mu = tr(S) / D and
    s = min(b, d) / d, where d = ||S - mu I||_F^2 / D and b = (sum_k ||x_k||^4 / N - ||S||_F^2) / (N D)
    (Ledoit & Wolf 2004, "A well-conditioned estimator for large-dimensional covariance matrices";
    the same estimate as scikit-learn's ``LedoitWolf(assume_centered=False)``).

    Returns:
        ((D, D) covariance, shrinkage s in [0, 1]).
    """
    n, dim = features.shape
    x = features - features.mean(dim=0)
    emp = x.T @ x / n
    mu = emp.diagonal().sum() / dim
    emp_sq = emp.pow(2).sum()
    row_sq = x.pow(2).sum(dim=1)
    beta = (row_sq.pow(2).sum() / n - emp_sq) / (n * dim)
    delta = (emp_sq - 2.0 * mu * emp.diagonal().sum() + dim * mu**2) / dim
    shrinkage = 0.0 if float(beta) <= 0.0 or float(delta) == 0.0 else float(torch.clamp(beta / delta, max=1.0))
    covariance = (1.0 - shrinkage) * emp
    covariance.diagonal().add_(shrinkage * mu)
    return covariance, shrinkage


@dataclass
class TaskPrototype:
    """Mean and shrinkage precision of one task's image features.

    Attributes:
        mean: (D,) mean router feature.
        precision: (D, D) inverse of the Ledoit-Wolf shrinkage covariance.
        shrinkage: Ledoit-Wolf shrinkage coefficient used.
        num_samples: training images the prototype was estimated from.
    """

    mean: Tensor
    precision: Tensor
    shrinkage: float
    num_samples: int

    @classmethod
    def fit(cls, features: Tensor) -> "TaskPrototype":
        """The prototype of all a task's training images: (N, D) router features (the mean patch
        feature per image), N >= 2."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"a task prototype needs (N>=2, D) features, got {tuple(features.shape)}")
        data = features.detach().double()  # float64 on the features' device
        covariance, shrinkage = ledoit_wolf(data)
        precision = torch.linalg.inv(covariance)
        return cls(mean=data.mean(dim=0).float().cpu(), precision=precision.float().cpu(),
                   shrinkage=shrinkage, num_samples=int(data.shape[0]))

    def state(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "precision": self.precision,
                "shrinkage": torch.tensor(self.shrinkage), "num_samples": torch.tensor(self.num_samples)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> "TaskPrototype":
        return cls(mean=state["mean"], precision=state["precision"],
                   shrinkage=float(state["shrinkage"]), num_samples=int(state["num_samples"]))


class PrototypeRouter:
    """Route each image to argmin_t distance(f, prototype_t) over the tasks seen so far.

    Args:
        mahalanobis: Mahalanobis distance with the shrinkage precision (default) or Euclidean.
    """

    def __init__(self, mahalanobis: bool = True) -> None:
        self.mahalanobis = mahalanobis
        self.prototypes: list[TaskPrototype] = []
        self._on_device: dict[str, list[tuple[Tensor, Tensor]]] = {}  # device -> [(mean, precision)]

    @property
    def num_tasks(self) -> int:
        return len(self.prototypes)

    def add_task(self, features: Tensor) -> None:
        """Add the next task's prototype from its (N, D) training router features."""
        self.prototypes.append(TaskPrototype.fit(features))
        self._on_device.clear()

    def _prototypes_on(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Every prototype's (mean, precision), copied to ``device`` once (not in every call)."""
        key = str(device)
        cached = self._on_device.get(key)  # emptied by add_task()
        if cached is None:
            cached = [(p.mean.to(device), p.precision.to(device)) for p in self.prototypes]
            self._on_device[key] = cached
        return cached

    def distances(self, features: Tensor) -> Tensor:
        """(N, D) -> (N, T) squared distances to every prototype."""
        if not self.prototypes:
            raise RuntimeError("the router has no task prototypes yet")
        feats = features.float()
        out = []
        for mean, precision in self._prototypes_on(feats.device):
            diff = feats - mean
            if self.mahalanobis:
                out.append(((diff @ precision) * diff).sum(dim=1))
            else:
                out.append(diff.pow(2).sum(dim=1))
        return torch.stack(out, dim=1)

    def route(self, features: Tensor) -> Tensor:
        """(N, D) -> (N,) task ids."""
        return self.distances(features).argmin(dim=1)

    def state(self) -> dict:
        return {"mahalanobis": self.mahalanobis, "prototypes": [p.state() for p in self.prototypes]}

    @classmethod
    def from_state(cls, state: dict) -> "PrototypeRouter":
        router = cls(mahalanobis=bool(state["mahalanobis"]))
        router.prototypes = [TaskPrototype.from_state(s) for s in state["prototypes"]]
        return router
