"""Datasets (MVTec AD, VisA, MPDD, any MVTec-layout folder), transforms, task split, demo data.

Listing, loading and checking the files needs neither torch nor scipy, so the command line can
check its data before those load: the image transform (``AnomalyDataset``, torch) and the demo
generator (scipy) are imported on first use.
"""

from typing import Any

from moleflow.data.base import (
    DATASET_CLASSES, DATASETS, DEMO_CLASSES, IMAGE_EXTENSIONS, ClassSplit, DataError, Sample,
)
from moleflow.data.loaders import (
    default_task_classes, list_classes, load_checked_splits, load_class_split, validate_samples,
)
from moleflow.data.tasks import parse_cl_scenario, split_tasks

_LAZY = {"IMAGENET_MEAN": "dataset", "IMAGENET_STD": "dataset", "AnomalyDataset": "dataset",
         "generate_demo_dataset": "demo"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"moleflow.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moleflow.data' has no attribute {name!r}")


__all__ = [
    "DATASETS", "DATASET_CLASSES", "DEMO_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_EXTENSIONS", "AnomalyDataset", "ClassSplit", "DataError", "Sample",
    "default_task_classes", "generate_demo_dataset", "list_classes", "load_checked_splits",
    "load_class_split", "parse_cl_scenario", "split_tasks", "validate_samples",
]
