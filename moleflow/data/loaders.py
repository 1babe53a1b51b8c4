"""Dataset-independent entry points: list the classes, load a class, check the files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from moleflow.data.base import DATASET_CLASSES, ClassSplit, DataError, Sample, check_dataset_name, one_line
from moleflow.data.mvtec import list_mvtec_classes, load_mvtec_split
from moleflow.data.visa import SPLIT_CSV, list_visa_classes, load_visa_split


def list_classes(dataset: str, root: Path) -> list[str]:
    """Classes present on disk under ``root``: for ``mvtec``/``mpdd``/``visa`` in the canonical order of
    ``DATASET_CLASSES`` (unknown extra ones after, sorted); for ``folder`` the sorted sub-folders that
    have ``train/good``. Raises :class:`DataError` for an unknown dataset or a missing root."""
    check_dataset_name(dataset)
    if dataset == "visa":
        return list_visa_classes(Path(root))
    return list_mvtec_classes(dataset, Path(root))


def default_task_classes(dataset: str, root: Path) -> list[str]:
    """The classes a run learns without ``--task_classes``: the dataset's standard classes in canonical
    order (MVTec AD 15, VisA 12, MPDD 6); for ``folder`` the sorted class folders under ``root`` with
    ``train/good`` (:class:`DataError` when there are none)."""
    check_dataset_name(dataset)
    if dataset != "folder":
        return list(DATASET_CLASSES[dataset])
    found = list_classes("folder", Path(root))
    if not found:
        raise DataError(f"no class folders with train/good under {root}; point --data_path at the dataset "
                        "root or pass --task_classes NAME ...")
    return found


def load_class_split(dataset: str, root: Path, class_name: str) -> ClassSplit:
    """The training (good only) and test samples of one class; :class:`DataError` names the path and
    the fix."""
    check_dataset_name(dataset)
    if dataset == "visa":
        return load_visa_split(Path(root), class_name)
    return load_mvtec_split(dataset, Path(root), class_name)


def load_checked_splits(dataset: str, root: Path, classes: Sequence[str]) -> dict[str, ClassSplit]:
    """Load every class of a run and check, without torch, everything training and evaluation will
    read: the split, a test set with both defect-free and defective images (image AUROC and AP need
    both) and every file's header (:func:`validate_samples`).

    Returns:
        ``{class name: split}`` in the order of ``classes``.

    Raises:
        DataError: The first problem found, naming the class or file and the fix.
    """
    splits: dict[str, ClassSplit] = {}
    for name in classes:
        split = load_class_split(dataset, root, name)
        check_test_labels(split, dataset, Path(root))
        validate_samples([*split.train, *split.test])
        splits[name] = split
    return splits


def check_test_labels(split: ClassSplit, dataset: str, root: Path) -> None:
    """Raise :class:`DataError` unless the test set holds defect-free and defective images."""
    labels = {s.label for s in split.test}
    if labels >= {0, 1}:
        return
    name = split.class_name
    good_missing = 0 not in labels
    kind = "defect-free" if good_missing else "defective"
    if dataset == "visa":
        where = root / SPLIT_CSV
        fix = f"add rows with object={name}, split=test, label={'normal' if good_missing else 'anomaly'} to {where}"
    else:
        test_dir = root / name / "test"
        where = test_dir / "good" if good_missing else test_dir / "<defect>"
        fix = (f"add defect-free images to {test_dir / 'good'}" if good_missing else
               f"add defective images in {test_dir}/<defect>/ with masks in {root / name / 'ground_truth'}/<defect>/")
    raise DataError(f"class {name!r} has no {kind} test images ({where}); image AUROC needs both good and "
                    f"defective test images: {fix}")


ASPECT_TOLERANCE = 0.01  # relative difference of width/height between a mask and its image


def validate_samples(samples: Sequence[Sample]) -> None:
    """Open every image and mask header (no full decode); :class:`DataError` names the first file that
    is missing, corrupt or not an image, or a mask whose aspect ratio differs from its image's (a
    mask may be a scaled copy, within :data:`ASPECT_TOLERANCE`)."""
    for sample in samples:
        iw, ih = check_image_file(sample.image_path, "image")
        if sample.mask_path is None:
            continue
        mw, mh = check_image_file(sample.mask_path, "mask")
        if abs((mw / mh) / (iw / ih) - 1.0) > ASPECT_TOLERANCE:
            raise DataError(f"mask {sample.mask_path} is {mw}x{mh} px but its image {sample.image_path} is "
                            f"{iw}x{ih} px (aspect ratios differ, the mask would be stretched); replace the mask "
                            "with one of the image's shape")


def check_image_file(path: Path, kind: str) -> tuple[int, int]:
    """Return ``path``'s (width, height) from its header; raise :class:`DataError` when PIL cannot
    identify and verify it."""
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read {kind} {path}: {one_line(error)}; replace or remove the file") from error
    if min(size) < 1:
        raise DataError(f"{kind} {path} is {size[0]}x{size[1]} px (empty); replace or remove the file")
    return size
