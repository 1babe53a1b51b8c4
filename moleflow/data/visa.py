"""Loader for VisA through its split file ``root/split_csv/1cls.csv``.

The csv has the columns ``object, split, label, image, mask``: ``split`` is ``train`` or
``test``, ``label`` is ``normal`` or ``anomaly``, ``image`` and ``mask`` are paths relative to
``root`` (``mask`` empty for normal images). Training uses the normal rows of the train split.
"""

from __future__ import annotations

import csv
from pathlib import Path

from moleflow.data.base import ClassSplit, DataError, Sample, check_root, order_classes

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def list_visa_classes(root: Path) -> list[str]:
    """Objects named in the VisA split file, in canonical VisA order then the rest sorted."""
    return order_classes({row["object"] for row in _read_rows(root)}, "visa")


def load_visa_split(root: Path, class_name: str) -> ClassSplit:
    """The train (normal rows of the train split) and test samples of one VisA object.

    Raises:
        DataError: The csv is missing or malformed, the class is unknown, a listed file does
            not exist, an anomalous row has no mask, or the class has no training image.
    """
    rows = _read_rows(root)
    root = Path(root)
    mine = [row for row in rows if row["object"] == class_name]
    if not mine:
        found = order_classes({row["object"] for row in rows}, "visa")
        raise DataError(f"class {class_name!r} not found in {root / SPLIT_CSV}; classes found there: "
                        f"{', '.join(found) if found else 'none'}; pass --task_classes with these names")
    train: list[Sample] = []
    test: list[Sample] = []
    for row in mine:
        sample = _row_sample(root, row)
        if row["split"] == "train" and sample.label == 0:
            train.append(sample)
        elif row["split"] == "test":
            test.append(sample)
    if not train:
        raise DataError(f"no normal training rows for {class_name!r} in {root / SPLIT_CSV}; "
                        "add rows with split=train, label=normal")
    train.sort(key=lambda s: str(s.image_path))
    test.sort(key=lambda s: (s.defect_type, s.image_path.name, str(s.image_path)))
    return ClassSplit(class_name, train, test)


def _read_rows(root: Path) -> list[dict[str, str]]:
    """Rows of the split csv with whitespace stripped; checks the header, split and label values."""
    csv_path = check_root(root) / SPLIT_CSV
    if not csv_path.is_file():
        raise DataError(f"VisA split file {csv_path} not found; pass --data_path pointing at the "
                        "VisA root that holds split_csv/1cls.csv")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"{csv_path} lacks the column(s) {', '.join(missing)}; the header must be "
                            f"{','.join(COLUMNS)}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    for line, row in enumerate(rows, start=2):
        if row["split"] not in ("train", "test") or row["label"] not in LABELS:
            raise DataError(f"{csv_path} line {line}: split {row['split']!r} / label {row['label']!r}; "
                            "use split train|test and label normal|anomaly")
    return rows


def _row_sample(root: Path, row: dict[str, str]) -> Sample:
    """One csv row as a :class:`Sample`, checking that its files exist."""
    image = root / row["image"]
    if not image.is_file():
        raise DataError(f"image {image} listed in {root / SPLIT_CSV} does not exist; "
                        "restore the file or remove its row")
    label = LABELS[row["label"]]
    if label == 0:
        return Sample(image, 0, None, "good", row["object"])
    if not row["mask"]:
        raise DataError(f"anomalous image {image} has no mask in {root / SPLIT_CSV}; "
                        "fill its mask column")
    mask = root / row["mask"]
    if not mask.is_file():
        raise DataError(f"mask {mask} of image {image} does not exist; restore the mask or remove the row")
    return Sample(image, 1, mask, "anomaly", row["object"])
