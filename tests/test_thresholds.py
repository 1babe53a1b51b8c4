"""Held-out images and the decision metrics on hand-made cases (pure functions, no model)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from moleflow.data.base import ClassSplit, Sample
from moleflow.data.holdout import held_out_count, hold_out, hold_out_splits
from moleflow.evaluation.thresholds import (
    decisions, f1_max, f1_precision_recall, per_image_thresholds, quantile_threshold, threshold_metrics,
)


def _split(name: str, n: int) -> ClassSplit:
    return ClassSplit(name, [Sample(Path(f"{name}/train/good/{i:03d}.png"), 0, None, "good", name) for i in range(n)],
                      [])


@pytest.mark.parametrize(("n", "fraction", "held"), [(240, 0.1, 24), (50, 0.1, 5), (8, 0.1, 1), (4, 0.1, 1),
                                                     (3, 0.1, 1), (2, 0.1, 0), (50, 0.0, 0), (10, 0.45, 5)])
def test_held_out_count_keeps_one_image_and_two_to_train_on(n: int, fraction: float, held: int) -> None:
    assert held_out_count(n, fraction) == held


def test_hold_out_is_deterministic_disjoint_and_in_file_order() -> None:
    split = _split("hazelnut", 50)
    train, held = hold_out(split, 0.1, seed=0)
    again_train, again_held = hold_out(split, 0.1, seed=0)
    assert held == again_held and train.train == again_train.train and len(held) == 5 and len(train.train) == 45
    assert sorted(train.train + held, key=lambda s: s.image_path) == split.train
    assert held == sorted(held, key=lambda s: s.image_path)
    assert hold_out(split, 0.1, seed=1)[1] != held  # another seed, another pick
    assert hold_out(_split("transistor", 50), 0.1, seed=0)[1] != [s for s in held]  # per class
    kept, by_class = hold_out_splits({"a": _split("a", 10), "b": _split("b", 10)}, 0.0, seed=0)
    assert by_class == {"a": [], "b": []} and len(kept["a"].train) == 10


def test_quantile_threshold_and_decisions() -> None:
    assert quantile_threshold([1.0, 2.0, 3.0], 1.0) == 3.0 and quantile_threshold([1.0, 3.0], 0.5) == 2.0
    assert quantile_threshold([], 0.99) is None
    assert quantile_threshold([0.0, 10.0], 0.99) == pytest.approx(9.9)  # linear interpolation
    got = decisions([1.0, 2.0, 3.0, 3.0], [2.0, 2.0, 2.0, float("nan")])
    assert got[:3].tolist() == [0.0, 0.0, 1.0] and math.isnan(got[3])  # strictly above the threshold
    by_image = per_image_thresholds([1, 0, 1], [0.5, None])  # each image: its routed task's threshold
    assert math.isnan(by_image[0]) and by_image[1] == 0.5 and math.isnan(by_image[2])


def test_f1_precision_recall_on_a_hand_case() -> None:
    labels = [0, 0, 0, 1, 1, 1, 1]
    called = [0, 1, 0, 1, 1, 0, 0]  # TP 2, FP 1, FN 2
    got = f1_precision_recall(labels, called)
    assert got["precision_at_threshold"] == pytest.approx(2 / 3) and got["recall_at_threshold"] == pytest.approx(0.5)
    assert got["f1_at_threshold"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    none = f1_precision_recall(labels, [0] * 7)
    assert none == {"f1_at_threshold": 0.0, "precision_at_threshold": 0.0, "recall_at_threshold": 0.0}
    assert all(math.isnan(v) for v in f1_precision_recall(labels, [0, 1, float("nan"), 0, 0, 0, 0]).values())


def test_f1_max_is_the_best_threshold_on_the_test_set() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    best = max(f1_precision_recall(labels, (scores >= t).astype(float))["f1_at_threshold"] for t in scores)
    assert f1_max(labels, scores) == pytest.approx(best) == pytest.approx(2 * 3 / (4 + 3))
    assert f1_max([0, 1, 1], [0.5, 0.5, 0.5]) == pytest.approx(0.8)  # ties are one threshold
    metrics = threshold_metrics(labels, scores, [0.45] * 6)
    assert metrics["f1_at_threshold"] == pytest.approx(0.8) and metrics["f1_max_test_picked"] == pytest.approx(6 / 7)
