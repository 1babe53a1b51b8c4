"""The fast paths compute exactly what the plain ones do.

GPU-only paths are checked here on the CPU: the torch pixel metrics against the numpy ones, the
sync-free training step (fused optimizer, non-finite batches skipped through ``found_inf``)
against the plain skip, the threaded image loading against loading in order.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moleflow.config.ablation import AblationConfig
from moleflow.data import AnomalyDataset, load_class_split
from moleflow.evaluation import metrics, metrics_torch
from moleflow.build import build_flow, build_trainer
from moleflow.trainer import steps
from moleflow.trainer.continual_trainer import MoLEContinualTrainer
from moleflow.extractors.features import FeatureSet, iter_batches
from moleflow.utils.precision import matmul_tf32


def _case(seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, size = 12, 40
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(5, n):
        for _ in range(rng.integers(1, 3)):  # one or two regions, some touching
            y, x = rng.integers(0, size - 10, 2)
            masks[i, y:y + rng.integers(2, 10), x:x + rng.integers(2, 10)] = 1
    maps = rng.normal(size=masks.shape).astype(np.float32) + 1.5 * masks
    if ties:
        maps = np.round(maps * 3) / 3
    labels = (masks.reshape(n, -1).max(axis=1) > 0).astype(int)
    scores = maps.reshape(n, -1).max(axis=1)
    return labels, scores, masks, maps


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_torch_metrics_equal_numpy_metrics(seed: int, ties: bool) -> None:
    labels, scores, masks, maps = _case(seed, ties)
    expected = metrics.class_metrics(labels, scores, masks, maps)
    got = metrics_torch.class_metrics(torch.from_numpy(labels), torch.from_numpy(scores), torch.from_numpy(masks),
                                      torch.from_numpy(maps))
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_torch_metrics_undefined_cases_match_numpy() -> None:
    _, _, masks, maps = _case(3, False)
    empty = np.zeros_like(masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricUndefinedWarning)
        got = metrics_torch.pixel_metrics(torch.from_numpy(empty), torch.from_numpy(maps))
    assert all(np.isnan(v) for v in got.values())
    bad = torch.from_numpy(maps).clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metrics_torch.pixel_metrics(torch.from_numpy(masks), bad)


def _train(sync_free: bool, nan_images: list[int], graphs: bool = False,
           slow: bool = False) -> tuple[MoLEContinualTrainer, list]:
    cfg = AblationConfig(feature_dim=16, lora_rank=2, num_coupling_layers=2, num_epochs=3, batch_size=4,
                         max_skip_fraction=0.6, scale_context_kernel=3, enable_slow_stage=slow,
                         slow_stage_start=0.5)
    torch.manual_seed(0)
    model = build_flow(cfg, 16)
    logger = logging.getLogger("test_speed_paths")
    trainer = build_trainer(cfg, model, torch.device("cpu"), logger)
    trainer.strategy = steps.Strategy(fused=True, sync_free=sync_free, graphs=graphs)
    stats = []
    for task in range(2):
        patches = torch.randn(10, 4, 4, 16, generator=torch.Generator().manual_seed(task)) + task
        router = patches.mean(dim=(1, 2))
        for i in nan_images:
            patches[i, 0, 0, 0] = float("nan")
        stats.append(trainer.train_task(task, FeatureSet(patches, router, torch.zeros(10, dtype=torch.long), None)))
    return trainer, stats


@pytest.mark.parametrize("graphs,slow", [(False, False), (True, False), (True, True)])
def test_sync_free_training_step_equals_plain_skip(graphs: bool, slow: bool) -> None:
    """found_inf skipping is bit-identical to not stepping, with and without non-finite batches.

    ``graphs``: full batches through the fixed input buffer of the recorded step (10 images in
    batches of 4: two full batches and a last one of 2 that steps directly), after the dry
    warm-up passes that recording needs. ``slow``: the SLOW stage adds a parameter group in the
    last epoch, so the step is set up again.
    """
    for nan_images in ([], [3]):
        plain, plain_stats = _train(sync_free=False, nan_images=nan_images, slow=slow)
        fast, fast_stats = _train(sync_free=True, nan_images=nan_images, graphs=graphs, slow=slow)
        assert [(s.steps, s.skipped_batches) for s in fast_stats] == [(s.steps, s.skipped_batches) for s in plain_stats]
        if nan_images:
            assert all(s.skipped_batches == 3 for s in fast_stats)  # one of 3 batches, 3 epochs
        for a, b in zip(plain_stats, fast_stats):
            assert a.final_loss == b.final_loss
        for (name, a), (_, b) in zip(plain.model.state_dict().items(), fast.model.state_dict().items()):
            assert torch.equal(a, b), name


def test_threaded_loading_equals_loading_in_order(tiny_data: Path) -> None:
    split = load_class_split("folder", tiny_data, "tile")
    plain = list(iter_batches(AnomalyDataset(split.test, 48), batch_size=3, threads=1))
    threaded = list(iter_batches(AnomalyDataset(split.test, 48), batch_size=3, threads=4))
    assert len(plain) == len(threaded) == -(-len(split.test) // 3)
    for a, b in zip(plain, threaded):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_augmenting_dataset_is_read_in_order(tiny_data: Path) -> None:
    split = load_class_split("folder", tiny_data, "fabric")
    torch.manual_seed(5)
    first = torch.cat([b["image"] for b in iter_batches(AnomalyDataset(split.train, 48, augment=True), 4, threads=1)])
    torch.manual_seed(5)
    second = torch.cat([b["image"] for b in iter_batches(AnomalyDataset(split.train, 48, augment=True), 4, threads=4)])
    assert torch.equal(first, second)


def test_matmul_tf32_switch_restores_the_setting() -> None:
    before = torch.backends.cuda.matmul.allow_tf32
    with matmul_tf32(torch.device("cpu"), True):
        assert torch.backends.cuda.matmul.allow_tf32 == before  # no-op off CUDA
    with matmul_tf32(torch.device("cuda"), not before):
        assert torch.backends.cuda.matmul.allow_tf32 == (not before)
    assert torch.backends.cuda.matmul.allow_tf32 == before
