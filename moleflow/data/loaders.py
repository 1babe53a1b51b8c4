"""Dataset-independent entry points: list the classes, load a class, check the files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from moleflow.data.base import ClassSplit, DataError, Sample, check_dataset_name, one_line
from moleflow.data.mvtec import list_mvtec_classes, load_mvtec_split
from moleflow.data.visa import list_visa_classes, load_visa_split


def list_classes(dataset: str, root: Path) -> list[str]:
    """Classes actually present on disk.

    Args:
        dataset: One of ``mvtec``, ``visa``, ``mpdd``, ``folder``.
        root: The dataset root.

    Returns:
        For ``mvtec``/``mpdd``/``visa`` the classes in the canonical order of
        ``DATASET_CLASSES`` (unknown extra ones after, sorted); for ``folder`` the sorted
        sub-folders that have ``train/good``.

    Raises:
        DataError: Unknown dataset or missing root.
    """
    check_dataset_name(dataset)
    if dataset == "visa":
        return list_visa_classes(Path(root))
    return list_mvtec_classes(dataset, Path(root))


def load_class_split(dataset: str, root: Path, class_name: str) -> ClassSplit:
    """Read the training and test samples of one class.

    Args:
        dataset: One of ``mvtec``, ``visa``, ``mpdd``, ``folder``.
        root: The dataset root.
        class_name: The class to read.

    Returns:
        The class split (train: good images only; test: good and defective with masks).

    Raises:
        DataError: With a one-line message naming the path/value and the fix.
    """
    check_dataset_name(dataset)
    if dataset == "visa":
        return load_visa_split(Path(root), class_name)
    return load_mvtec_split(dataset, Path(root), class_name)


def validate_samples(samples: Sequence[Sample]) -> None:
    """Open every image and mask header and check its structure (cheap; no full decode).

    Args:
        samples: The samples to check.

    Raises:
        DataError: Naming the first file that is missing, corrupt or not an image.
    """
    for sample in samples:
        check_image_file(sample.image_path, "image")
        if sample.mask_path is not None:
            check_image_file(sample.mask_path, "mask")


def check_image_file(path: Path, kind: str) -> None:
    """Raise :class:`DataError` when PIL cannot identify and verify ``path``."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        message = f"cannot read {kind} {path}: {one_line(error)}; replace or remove the file"
        raise DataError(message) from error
