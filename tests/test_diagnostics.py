"""Diagnostics plots write real, non-empty PNGs; the confusion CSV has the right layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moleflow.evaluation import plots as diag

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["leather", "grid", "tile"]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000, f"{path.name} is suspiciously small ({len(data)} bytes)"


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_latent_logdet_and_scatter_plots(tmp_path: Path, rng: np.random.Generator) -> None:
    diag.plot_latent_vs_gaussian(rng.normal(size=(50, 64)), tmp_path / "latent.png")
    diag.plot_logdet_spread(rng.normal(100.0, 5.0, size=40), tmp_path / "logdet.png")
    labels = rng.integers(0, 2, size=60)
    diag.plot_znorm_vs_logdet(rng.random(60) * 30, rng.normal(size=60), labels,
                              tmp_path / "sub" / "znorm.png")
    for name in ("latent.png", "logdet.png", "sub/znorm.png"):
        _assert_png(tmp_path / name)


def test_score_distributions(tmp_path: Path, rng: np.random.Generator) -> None:
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    scores = rng.normal(size=50) + 2 * labels
    diag.plot_score_distributions(scores, labels, "leather", tmp_path / "scores.png")
    _assert_png(tmp_path / "scores.png")


def test_anomaly_overlays_both_image_layouts(tmp_path: Path, rng: np.random.Generator) -> None:
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 8:16, 10:20] = True
    maps = rng.random((2, 32, 32)) + 3 * masks
    normalised = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    diag.plot_anomaly_overlays(normalised, maps, masks, ["defect_000", "good_001"],
                               tmp_path / "overlay_norm.png")
    uint8 = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    diag.plot_anomaly_overlays(uint8, maps, masks, ["a", "b"], tmp_path / "overlay_uint8.png")
    _assert_png(tmp_path / "overlay_norm.png")
    _assert_png(tmp_path / "overlay_uint8.png")
    with pytest.raises(ValueError, match="titles"):
        diag.plot_anomaly_overlays(uint8, maps, masks, ["only one"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        diag.plot_anomaly_overlays(np.zeros((2, 32, 32)), maps, masks, ["a", "b"], tmp_path / "x.png")


def test_confusion_and_accuracy_matrices(tmp_path: Path) -> None:
    conf = np.array([[20, 1, 0], [0, 18, 3], [2, 0, 25]])
    diag.plot_confusion_matrix(conf, NAMES, tmp_path / "confusion.png")
    R = np.array([[0.9, np.nan, np.nan], [0.93, 0.95, np.nan], [0.7, 0.85, 0.99]])
    diag.plot_accuracy_matrix(R, NAMES, "img_auroc", tmp_path / "R.png")
    _assert_png(tmp_path / "confusion.png")
    _assert_png(tmp_path / "R.png")
    with pytest.raises(ValueError, match="3 tasks"):
        diag.plot_confusion_matrix(conf[:2, :2], NAMES, tmp_path / "bad.png")


def test_save_confusion_csv(tmp_path: Path) -> None:
    conf = np.array([[5, 1], [0, 7]])
    diag.save_confusion_csv(conf, ["a", "b"], tmp_path / "conf.csv")
    table = pd.read_csv(tmp_path / "conf.csv", index_col=0)
    assert table.index.name == "true\\routed"
    assert list(table.columns) == ["a", "b"]
    np.testing.assert_array_equal(table.to_numpy(), conf)
