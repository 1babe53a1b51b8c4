"""Continual-learning accuracy matrices, forgetting and backward transfer.

``R[i][j]`` is a metric on task ``j`` measured right after training task ``i`` (NaN where
``j > i`` or not measured). With ``T`` the last trained task:

- forgetting  FM  = mean over j < T of ( max_{i in [j, T-1]} R[i][j] - R[T][j] )
- backward transfer BWT = mean over j < T of ( R[T][j] - R[j][j] )

Entries that were not measured (NaN) are left out of the max and the means; a value that
cannot be formed from any measured entry is NaN.

Each entry is the mean over the classes of task ``j``. The final mean weights each task by its class
count, so it equals the ``mean`` row of ``final_results.csv`` also with several classes per task
(``--cl_scenario 2-1``); FM and BWT are means over tasks.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Mapping, Optional

import numpy as np


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _csv_cell(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


class ContinualMatrix:
    """Accuracy matrix of one metric over a sequence of tasks.

    Args:
        num_tasks: Number of tasks in the sequence.
        task_names: One name per task (e.g. the class, or ``'bottle+cable'`` for a group).
        class_counts: Classes per task (default one each): the weights of :meth:`final_mean`.
    """

    def __init__(self, num_tasks: int, task_names: list[str], class_counts: Optional[list[int]] = None) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if len(task_names) != num_tasks:
            raise ValueError(f"{len(task_names)} task names for {num_tasks} tasks")
        counts = [1] * num_tasks if class_counts is None else list(class_counts)
        if len(counts) != num_tasks or min(counts) < 1:
            raise ValueError(f"class_counts {counts} must hold one positive count per task")
        self.num_tasks = num_tasks
        self.task_names = list(task_names)
        self.class_counts = counts
        self._values = np.full((num_tasks, num_tasks), np.nan)
        self._trained = np.zeros(num_tasks, dtype=bool)

    @property
    def values(self) -> np.ndarray:
        """A copy of ``R``, ``(num_tasks, num_tasks)``, NaN where not measured."""
        return self._values.copy()

    @property
    def last_task(self) -> int:
        """``T``, the last task with a measured row; -1 if nothing was set."""
        trained = np.flatnonzero(self._trained)
        return int(trained[-1]) if trained.size else -1

    def set(self, after_task: int, task: int, value: float) -> None:
        """Record ``R[after_task][task] = value``; ValueError if an index is out of range or task > after_task."""
        for name, idx in (("after_task", after_task), ("task", task)):
            if not 0 <= idx < self.num_tasks:
                raise ValueError(f"{name}={idx} outside [0, {self.num_tasks - 1}]")
        if task > after_task:
            raise ValueError(f"task {task} is not trained yet after task {after_task}")
        self._values[after_task, task] = float(value)
        self._trained[after_task] = True

    def final_mean(self) -> float:
        """Mean over the classes of tasks 0..T in the last measured row: each task's entry weighted
        by its class count (NaN if nothing was set; unmeasured entries are left out)."""
        last = self.last_task  # -1 if nothing was set: an empty row, NaN
        row = self._values[last, : last + 1]
        weights = np.asarray(self.class_counts[: last + 1], dtype=np.float64)
        measured = ~np.isnan(row)
        if not measured.any():
            return float("nan")
        return float(np.sum(row[measured] * weights[measured]) / np.sum(weights[measured]))

    def forgetting(self) -> float:
        """Forgetting measure FM; NaN if ``T == 0`` (nothing to forget yet)."""
        last = self.last_task
        gaps = []
        for j in range(max(last, 0)):
            earlier = self._values[j:last, j]
            if np.isnan(earlier).all():
                continue
            gaps.append(float(np.nanmax(earlier)) - self._values[last, j])
        return _nanmean(gaps)

    def backward_transfer(self) -> float:
        """Backward transfer BWT (negative = forgetting); NaN if ``T == 0``."""
        last = self.last_task
        return _nanmean([self._values[last, j] - self._values[j, j] for j in range(max(last, 0))])

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write ``R``: header ``after_task, <task names>``, rows ``after_task_i``; NaN -> empty."""
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["after_task", *self.task_names])
            for i, row in enumerate(self._values):
                writer.writerow([f"after_task_{i}", *(_csv_cell(v) for v in row)])


def write_continual_summary(matrices: Mapping[str, ContinualMatrix], path: str | os.PathLike) -> None:
    """Write ``continual_summary.csv`` at ``path``: per metric of ``matrices``, final_mean, forgetting, bwt."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "final_mean", "forgetting", "bwt"])
        for name, matrix in matrices.items():
            cells = (matrix.final_mean(), matrix.forgetting(), matrix.backward_transfer())
            writer.writerow([name, *(_csv_cell(v) for v in cells)])
