"""Metrics and anomaly maps on hand-made cases with known answers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from moleflow.evaluation import (
    METRIC_NAMES, MetricUndefinedWarning, anomaly_maps, aupro, auroc, average_precision,
    class_metrics, image_scores,
)

# ---------------------------------------------------------------- AUROC / AP


def test_perfect_separation_gives_one() -> None:
    labels, scores = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]
    assert auroc(labels, scores) == 1.0
    assert average_precision(labels, scores) == 1.0


def test_inverted_scores_give_zero_auroc() -> None:
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0


def test_all_equal_scores_give_half_auroc_and_prevalence_ap() -> None:
    labels = [0, 1, 0, 1, 0]
    assert auroc(labels, [3.0] * 5) == 0.5
    assert average_precision(labels, [3.0] * 5) == pytest.approx(2 / 5, abs=1e-15)


def test_ap_hand_case() -> None:
    # ranking: 1 (P=1, R=1/2), 0, 1 (P=2/3, R=1), 0  ->  AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6, abs=1e-15)
    # AUROC on the same case: pairs (pos, neg) ordered right 3 of 4
    assert auroc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.75, abs=1e-15)


def test_one_class_gives_nan_with_reason() -> None:
    with pytest.warns(MetricUndefinedWarning, match="no anomalous samples"):
        assert np.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.warns(MetricUndefinedWarning, match="no normal samples"):
        assert np.isnan(average_precision([1, 1], [0.1, 0.2]))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="only 0"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="3 values"):
        auroc([0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(2000) < 0.3
    scores = rng.normal(size=2000) + labels
    rounded = np.round(scores, 1)                     # many ties
    for s in (scores, rounded):
        assert abs(auroc(labels, s) - roc_auc_score(labels, s)) < 1e-12
        assert abs(average_precision(labels, s) - average_precision_score(labels, s)) < 1e-12


# ---------------------------------------------------------------- AUPRO


def test_aupro_hand_case_with_interpolation() -> None:
    # one 2x2 image, region = top row (2 px), normal pixels 0.5 and 0.1.
    # thresholds 0.9: PRO .5 FPR 0;  0.5: PRO 1 FPR .5;  0.1: PRO 1 FPR 1.
    # curve (0,0) (0,.5) (.5,1) (1,1): PRO(f) = .5 + f on [0, .5].
    masks = np.array([[[1, 1], [0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5], [0.5, 0.1]]])
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx((0.5 * 0.3 + 0.3**2 / 2) / 0.3, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx(0.75 / 1.0, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.375 + 0.5, abs=1e-12)


def test_aupro_step_case() -> None:
    # region (0.9, 0.2), normals (0.5, 0.1): PRO stays .5 until FPR .5 -> normalised area .5
    masks = np.array([[[1, 1], [0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.2], [0.5, 0.1]]])
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 3:9, 5:12] = True
    masks[2, 20:30, 1:4] = True
    masks[2, 2:4, 25:30] = True
    maps = masks + 0.1 * rng.random(masks.shape)      # every defect pixel above every normal one
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, maps, num_thresholds=50) == pytest.approx(1.0, abs=1e-12)


def test_aupro_single_region() -> None:
    # one region of 4 px: half of it scores 2, half 0; normals 1 -> PRO .5 up to FPR 1
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :4] = True
    maps = np.ones((1, 4, 4))
    maps[0, 0, :2], maps[0, 0, 2:] = 2.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_weighed_equally_not_by_size() -> None:
    # region A: 1 px, region B: 9 px (3x3), apart. Normal pixels score 0.5.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 4:7, 4:7] = True
    normal_level = np.full((1, 8, 8), 0.5)
    detect_small = np.where(masks, 0.0, normal_level)
    detect_small[0, 0, 0] = 1.0
    detect_big = np.where(masks, 0.0, normal_level)
    detect_big[0, 4:7, 4:7] = 1.0
    # found region counts 1, missed region 0 -> PRO .5 until FPR 1, regardless of size
    assert aupro(masks, detect_small) == pytest.approx(0.5, abs=1e-12)
    assert aupro(masks, detect_big) == pytest.approx(0.5, abs=1e-12)


def test_aupro_uses_8_connectivity_and_regions_of_all_images() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True             # diagonal: one region
    masks[1, 2, 2] = True                              # second image: one more region
    maps = np.where(masks, 0.0, 0.5)                   # normals 0.5, missed defect pixels 0
    maps[0, 0, 0] = 1.0                                # half of region 1 found
    # 8-connected: PRO = (0.5 + 0) / 2 = 0.25; 4-connected would give (1 + 0 + 0) / 3
    assert aupro(masks, maps) == pytest.approx(0.25, abs=1e-12)


def test_aupro_grid_approaches_exact() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 24, 24), dtype=bool)
    for i in range(6):
        r, c = rng.integers(0, 18, 2)
        masks[i, r:r + 5, c:c + 4] = True
    maps = ndimage.gaussian_filter(masks.astype(float), (0, 2, 2)) + 0.2 * rng.random(masks.shape)
    exact = aupro(masks, maps)
    assert 0.0 < exact < 1.0
    assert aupro(masks, maps, num_thresholds=5000) == pytest.approx(exact, abs=2e-3)


def test_aupro_without_defects_is_nan() -> None:
    with pytest.warns(MetricUndefinedWarning, match="no defect region"):
        assert np.isnan(aupro(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 4)))


def test_class_metrics_keys_and_values() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[3:, 4:9, 4:9] = True
    maps = rng.random(masks.shape) + 2.0 * masks
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = maps.reshape(6, -1).max(1)
    result = class_metrics(labels, scores, masks, maps)
    assert tuple(result) == ("img_auroc", "img_ap", "pixel_auroc", "pixel_ap", "aupro")
    assert set(result) <= set(METRIC_NAMES)
    assert all(isinstance(v, float) for v in result.values())
    assert result["img_auroc"] == result["img_ap"] == 1.0
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()),
                                               abs=1e-12)
    assert result["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-15)


def test_class_metrics_all_good_images_gives_nan_pixel_metrics() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        result = class_metrics([0, 1], [0.1, 0.2], masks, np.random.rand(2, 4, 4))
    assert result["img_auroc"] == 1.0
    assert np.isnan(result["pixel_auroc"]) and np.isnan(result["aupro"])


# ---------------------------------------------------------------- anomaly maps / image scores


def test_anomaly_maps_shape_and_dtype() -> None:
    out = anomaly_maps(torch.randn(2, 7, 5), (56, 40))
    assert out.shape == (2, 56, 40) and out.dtype == torch.float32


def test_delta_patch_gives_symmetric_blob_and_blur_keeps_mass() -> None:
    patches = torch.zeros(1, 9, 9)
    patches[0, 4, 4] = 1.0                            # support stays > 16 px from the border
    sharp = anomaly_maps(patches, (72, 72), sigma=0.0)
    blob = anomaly_maps(patches, (72, 72), sigma=4.0)[0]
    torch.testing.assert_close(blob, blob.flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(blob, blob.flip(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(blob, blob.T, atol=1e-6, rtol=0)
    assert blob.argmax().item() in {35 * 72 + 35, 35 * 72 + 36, 36 * 72 + 35, 36 * 72 + 36}
    assert blob.max() < sharp.max()                   # blurred peak is lower
    torch.testing.assert_close(blob.sum(), sharp.sum(), rtol=1e-5, atol=0)


def test_blur_matches_scipy_mirror_gaussian() -> None:
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(2, 6, 9))
    sharp = anomaly_maps(torch.from_numpy(patches), (30, 45), sigma=0.0).numpy()
    blurred = anomaly_maps(torch.from_numpy(patches), (30, 45), sigma=4.0).numpy()
    expected = ndimage.gaussian_filter(sharp, sigma=(0, 4.0, 4.0), mode="mirror", truncate=4.0)
    np.testing.assert_allclose(blurred, expected, atol=1e-10)
    # kernel wider than the map (radius 16 > 10 px) still works
    small = anomaly_maps(torch.from_numpy(patches), (10, 12), sigma=4.0).numpy()
    small_sharp = anomaly_maps(torch.from_numpy(patches), (10, 12), sigma=0.0).numpy()
    np.testing.assert_allclose(small, ndimage.gaussian_filter(small_sharp, (0, 4, 4), mode="mirror"),
                               atol=1e-10)


def test_image_scores_each_method() -> None:
    patches = torch.tensor([[[1.0, 5.0], [3.0, 2.0]],
                            [[0.0, 0.0], [0.0, 8.0]]])
    torch.testing.assert_close(image_scores(patches, "top_k", k=3), torch.tensor([10 / 3, 8 / 3]))
    torch.testing.assert_close(image_scores(patches, "top_k", k=1), torch.tensor([5.0, 8.0]))
    torch.testing.assert_close(image_scores(patches, "max"), torch.tensor([5.0, 8.0]))
    torch.testing.assert_close(image_scores(patches, "mean"), torch.tensor([11 / 4, 2.0]))
    torch.testing.assert_close(image_scores(patches, "percentile", percentile=50.0),
                               torch.tensor([2.5, 0.0]))
    expected = np.percentile(patches.reshape(2, -1).numpy(), 90.0, axis=1)
    torch.testing.assert_close(image_scores(patches, "percentile", percentile=90.0),
                               torch.from_numpy(expected).float())


def test_image_scores_bad_arguments() -> None:
    with pytest.raises(ValueError, match="top_k, max, mean, percentile"):
        image_scores(torch.zeros(1, 2, 2), "median")
    with pytest.raises(ValueError, match="k"):
        image_scores(torch.zeros(1, 2, 2), "top_k", k=5)
