"""Datasets (MVTec AD, VisA, MPDD, any MVTec-layout folder), transforms, task split, demo data."""

from moleflow.data.base import (
    DATASET_CLASSES, DATASETS, IMAGE_EXTENSIONS, ClassSplit, DataError, Sample,
)
from moleflow.data.dataset import IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset
from moleflow.data.demo import DEMO_CLASSES, generate_demo_dataset
from moleflow.data.loaders import list_classes, load_class_split, validate_samples
from moleflow.data.tasks import parse_cl_scenario, split_tasks

__all__ = [
    "DATASETS", "DATASET_CLASSES", "DEMO_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_EXTENSIONS", "AnomalyDataset", "ClassSplit", "DataError", "Sample",
    "generate_demo_dataset", "list_classes", "load_class_split", "parse_cl_scenario",
    "split_tasks", "validate_samples",
]
