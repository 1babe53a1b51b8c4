"""Continual accuracy matrices (FM, BWT) and continual_summary.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moleflow.evaluation import ContinualMatrix, write_continual_summary


#            task0  task1  task2
HAND = [[0.90, None, None],    # after task 0
        [0.93, 0.95, None],    # after task 1  (task 0 improved: the max is off the diagonal)
        [0.70, 0.85, 0.99]]    # after task 2


def _matrix(rows: list[list[float | None]]) -> ContinualMatrix:
    matrix = ContinualMatrix(3, ["leather", "grid", "tile"])
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if value is not None:
                matrix.set(i, j, value)
    return matrix


def test_forgetting_and_bwt_on_hand_matrix() -> None:
    matrix = _matrix(HAND)
    # FM: j=0: max(.90, .93) - .70 = .23 ; j=1: .95 - .85 = .10  -> .165
    assert matrix.forgetting() == pytest.approx(0.165, abs=1e-12)
    # BWT: j=0: .70 - .90 = -.20 ; j=1: .85 - .95 = -.10  -> -.15
    assert matrix.backward_transfer() == pytest.approx(-0.15, abs=1e-12)
    assert matrix.final_mean() == pytest.approx((0.70 + 0.85 + 0.99) / 3, abs=1e-12)
    assert matrix.last_task == 2


def test_final_mean_is_over_classes_when_tasks_hold_several() -> None:
    """Scenario 2-1: task 0 = (a, b) with class values 0.6 and 0.8, task 1 = (c) with 0.4.

    R[1][0] is task 0's class mean 0.7; the final mean is the mean over the three classes (0.6),
    as final_results.csv's mean row, not the mean over tasks ((0.7 + 0.4) / 2 = 0.55). FM and BWT
    stay means over tasks."""
    matrix = ContinualMatrix(2, ["a+b", "c"], class_counts=[2, 1])
    matrix.set(0, 0, 0.7)
    matrix.set(1, 0, 0.7)
    matrix.set(1, 1, 0.4)
    assert matrix.final_mean() == pytest.approx((0.6 + 0.8 + 0.4) / 3, abs=1e-12)
    assert matrix.forgetting() == 0.0 and matrix.backward_transfer() == 0.0
    with pytest.raises(ValueError, match="class_counts"):
        ContinualMatrix(2, ["a", "b"], class_counts=[1])


def test_partial_matrices() -> None:
    only_first = _matrix(HAND[:1])
    assert np.isnan(only_first.forgetting()) and np.isnan(only_first.backward_transfer())
    assert only_first.final_mean() == pytest.approx(0.90)
    first_two = _matrix(HAND[:2])
    assert first_two.forgetting() == pytest.approx(0.90 - 0.93, abs=1e-12)  # improvement
    assert first_two.backward_transfer() == pytest.approx(0.03, abs=1e-12)
    empty = ContinualMatrix(2, ["a", "b"])
    assert empty.last_task == -1 and np.isnan(empty.final_mean()) and np.isnan(empty.forgetting())


def test_values_nan_above_diagonal_and_set_validation() -> None:
    matrix = _matrix(HAND)
    values = matrix.values
    assert np.isnan(values[0, 1]) and np.isnan(values[1, 2]) and values[2, 1] == 0.85
    with pytest.raises(ValueError, match="not trained yet"):
        matrix.set(0, 1, 0.5)
    with pytest.raises(ValueError, match="outside"):
        matrix.set(3, 0, 0.5)
    with pytest.raises(ValueError, match="task names"):
        ContinualMatrix(2, ["a"])


def test_to_csv_layout(tmp_path: Path) -> None:
    path = tmp_path / "R.csv"
    _matrix(HAND).to_csv(path)
    table = pd.read_csv(path, index_col=0)
    assert list(table.columns) == ["leather", "grid", "tile"]
    assert list(table.index) == ["after_task_0", "after_task_1", "after_task_2"]
    assert table.loc["after_task_1", "leather"] == 0.93
    assert np.isnan(table.loc["after_task_0", "tile"])
    assert path.read_text().splitlines()[1] == "after_task_0,0.9,,"


def test_write_continual_summary(tmp_path: Path) -> None:
    path = tmp_path / "continual_summary.csv"
    write_continual_summary({"img_auroc": _matrix(HAND), "pixel_auroc": _matrix(HAND[:1])}, path)
    table = pd.read_csv(path)
    assert list(table.columns) == ["metric", "final_mean", "forgetting", "bwt"]
    assert list(table["metric"]) == ["img_auroc", "pixel_auroc"]
    assert table.loc[0, "forgetting"] == pytest.approx(0.165, abs=1e-12)
    assert table.loc[0, "bwt"] == pytest.approx(-0.15, abs=1e-12)
    assert np.isnan(table.loc[1, "forgetting"])

