"""Loader for the MVTec AD folder layout, used by MVTec AD, MPDD and any custom folder.

Layout::

    root/<class>/train/good/*                     defect-free training images
    root/<class>/test/good/*                      defect-free test images
    root/<class>/test/<defect>/*                  defective test images
    root/<class>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png) their masks

Image extensions are matched case-insensitively (png, jpg, jpeg, bmp, tif, tiff).
"""

from __future__ import annotations

from pathlib import Path

from moleflow.data.base import (
    DATASET_CLASSES, ClassSplit, DataError, Sample, check_root, image_files, order_classes, subfolders,
)

GOOD = "good"
MASK_SUFFIX = "_mask"


def list_mvtec_classes(dataset: str, root: Path) -> list[str]:
    """Classes under an MVTec-layout ``root``: for ``'mvtec'``/``'mpdd'`` the known classes whose folder
    exists, in canonical order, then any other folder with ``train/good``, sorted; for ``'folder'``
    the sorted sub-folders with ``train/good``."""
    root = check_root(root)
    with_train = {p.name for p in subfolders(root) if (p / "train" / GOOD).is_dir()}
    if dataset == "folder":
        return sorted(with_train)
    present = {p.name for p in subfolders(root)}
    return order_classes(with_train | (present & set(DATASET_CLASSES.get(dataset, []))), dataset)


def load_mvtec_split(dataset: str, root: Path, class_name: str) -> ClassSplit:
    """The train and test samples of one class of an MVTec-layout dataset (``'mvtec'``, ``'mpdd'`` or
    ``'folder'``); train sorted by file name, test by defect type then file name.

    Raises:
        DataError: The root or class is missing, ``train/good`` holds no image, ``test`` is
            missing or empty, a defective image has no mask, or a mask has no image.
    """
    root = check_root(root)
    class_dir = root / class_name
    if not class_dir.is_dir():
        found = list_mvtec_classes(dataset, root)
        raise DataError(f"class {class_name!r} not found in {root}; classes found there: "
                        f"{', '.join(found) if found else 'none'}; pass --task_classes with these names")
    train = [Sample(p, 0, None, GOOD, class_name) for p in image_files(class_dir / "train" / GOOD)]
    if not train:
        raise DataError(f"no training images in {class_dir / 'train' / GOOD}; "
                        "add defect-free .png/.jpg images there")
    return ClassSplit(class_name, train, _test_samples(class_dir, class_name))


def _test_samples(class_dir: Path, class_name: str) -> list[Sample]:
    """Test samples of a class folder: good images without mask, defective ones with their mask."""
    test_dir = class_dir / "test"
    if not test_dir.is_dir():
        raise DataError(f"test folder {test_dir} is missing; add test/good and test/<defect> "
                        "folders of images")
    samples: list[Sample] = []
    for defect_dir in subfolders(test_dir):
        defect = defect_dir.name
        images = image_files(defect_dir)
        if defect == GOOD:
            samples += [Sample(p, 0, None, GOOD, class_name) for p in images]
            continue
        masks = _mask_index(class_dir / "ground_truth" / defect, {p.stem for p in images})
        for image in images:
            mask = masks.get(image.stem)
            if mask is None:
                expected = class_dir / "ground_truth" / defect / f"{image.stem}{MASK_SUFFIX}.png"
                raise DataError(f"defective image {image} has no mask (expected {expected}); "
                                "add the mask or move the image out of test/")
            samples.append(Sample(image, 1, mask, defect, class_name))
    if not samples:
        raise DataError(f"test folder {test_dir} holds no images; add test/good and "
                        "test/<defect> folders of images")
    return sorted(samples, key=lambda s: (s.defect_type, s.image_path.name))


def _mask_index(gt_dir: Path, image_stems: set[str]) -> dict[str, Path]:
    """Map each image stem to its mask in ``gt_dir``; a mask that matches no image is an error.

    ``<stem>_mask.<ext>`` is preferred over ``<stem>.<ext>`` when both exist.
    """
    plain: dict[str, Path] = {}
    suffixed: dict[str, Path] = {}
    for mask in image_files(gt_dir):
        stem = mask.stem
        if stem.endswith(MASK_SUFFIX) and stem[: -len(MASK_SUFFIX)] in image_stems:
            suffixed.setdefault(stem[: -len(MASK_SUFFIX)], mask)
        elif stem in image_stems:
            plain.setdefault(stem, mask)
        else:
            image_dir = gt_dir.parent.parent / "test" / gt_dir.name
            raise DataError(f"mask {mask} has no image in {image_dir}; remove the mask or add the image")
    return {**plain, **suffixed}
