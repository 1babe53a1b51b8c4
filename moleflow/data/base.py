"""Shared data types, the known dataset classes and small file helpers.

Every loader turns a dataset folder into :class:`Sample` records grouped in a
:class:`ClassSplit`; nothing here reads pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class DataError(ValueError):
    """One-line, user-facing message that names the path/value and the fix."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset."""

    image_path: Path
    label: int                  # 0 good (defect-free), 1 defective
    mask_path: Optional[Path]   # the ground-truth mask of a defective image; None for good images
    defect_type: str            # 'good' or the name of the defect folder / kind
    class_name: str             # the product class


@dataclass
class ClassSplit:
    """The training and test images of one class."""

    class_name: str
    train: list[Sample]         # defect-free training images, sorted by file name
    test: list[Sample]          # good and defective test images, sorted by defect type then file name


DATASET_CLASSES: dict[str, list[str]] = {
    "mvtec": [
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    ],
    "visa": [
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    ],
    "mpdd": ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"],
}

DATASETS: tuple[str, ...] = ("mvtec", "visa", "mpdd", "folder")

DEMO_CLASSES: list[str] = ["fabric", "tile", "nut"]  # the embedded demo (moleflow/data/demo.py)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def check_dataset_name(dataset: str) -> None:
    """Raise :class:`DataError` unless ``dataset`` is one of :data:`DATASETS`."""
    if dataset not in DATASETS:
        raise DataError(f"dataset {dataset!r} is unknown; pass --dataset as one of {', '.join(DATASETS)}")


def check_root(root: Path) -> Path:
    """Return ``root`` as a :class:`Path`, or raise :class:`DataError` when it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist; pass --data_path pointing at the dataset root")
    return root


def _visible(folder: Path) -> list[Path]:
    """Non-hidden entries of ``folder``, sorted by name (empty when ``folder`` is missing)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def image_files(folder: Path) -> list[Path]:
    """Non-hidden files with an image extension (any case) directly inside ``folder``, sorted by name."""
    return [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def subfolders(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return [p for p in _visible(folder) if p.is_dir()]


def order_classes(found: set[str], dataset: str) -> list[str]:
    """Order class names: known classes of ``dataset`` in their canonical order, then the rest sorted."""
    known = DATASET_CLASSES.get(dataset, [])
    return [c for c in known if c in found] + sorted(found - set(known))


def one_line(error: BaseException) -> str:
    """An exception as one line of text (its type name when it carries no message)."""
    return " ".join(str(error).split()) or type(error).__name__
