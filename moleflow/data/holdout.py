"""Held-out training images (``--val_fraction``): a few good training images of each class that are
never trained on (not in the flow's training set, the patch memory, the memory's statistics or the
router prototype). After the class's task is trained they are scored to set its decision threshold
and the router's unknown-class limit, without looking at a single test label.

The pick is deterministic: it depends on the seed, the class name and the sorted file list only.
"""

from __future__ import annotations

import random
from typing import Sequence

from moleflow.data.base import ClassSplit, Sample

MIN_TRAIN_IMAGES = 2  # a task prototype (mean and covariance) needs at least two training images


def held_out_count(n_train: int, fraction: float) -> int:
    """How many of ``n_train`` images are held out: ``round(fraction * n)``, at least 1 when
    ``fraction > 0``, and never so many that fewer than ``MIN_TRAIN_IMAGES`` remain to train on."""
    if fraction <= 0.0:
        return 0
    wanted = max(1, int(fraction * n_train + 0.5))
    return max(0, min(wanted, n_train - MIN_TRAIN_IMAGES))


def hold_out(split: ClassSplit, fraction: float, seed: int) -> tuple[ClassSplit, list[Sample]]:
    """Split a class's training images into (the split with the images left to train on, the held-out
    images); both keep the file order. ``fraction`` is ``--val_fraction``; ``seed`` (``--seed``) and the
    class name fix the pick."""
    count = held_out_count(len(split.train), fraction)
    picked = set(random.Random(f"moleflow-held-out:{seed}:{split.class_name}").sample(range(len(split.train)), count))
    train = [s for i, s in enumerate(split.train) if i not in picked]
    held = [s for i, s in enumerate(split.train) if i in picked]
    return ClassSplit(split.class_name, train, split.test), held


def hold_out_splits(splits: dict[str, ClassSplit], fraction: float,
                    seed: int) -> tuple[dict[str, ClassSplit], dict[str, list[Sample]]]:
    """:func:`hold_out` for every class: (splits to train on, held-out images per class)."""
    kept: dict[str, ClassSplit] = {}
    held: dict[str, list[Sample]] = {}
    for name, split in splits.items():
        kept[name], held[name] = hold_out(split, fraction, seed)
    return kept, held


def held_out_of(held: dict[str, list[Sample]], classes: Sequence[str]) -> list[Sample]:
    """The held-out images of ``classes`` (one task), in class order."""
    return [s for c in classes for s in held.get(c, [])]
