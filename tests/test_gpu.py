"""GPU-only paths: the recorded training step trains exactly as the step launched kernel by
kernel; a routed batch of mixed experts scores each image as its own expert would.

Skipped without CUDA (CI has none); run on a GPU machine with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import logging
from typing import Optional

import pytest
import torch

from moleflow import precompile
from moleflow.build import build_flow, build_trainer
from moleflow.config.ablation import AblationConfig
from moleflow.extractors.features import FeatureSet
from moleflow.models import fusion
from moleflow.models.loss import moleflow_loss
from moleflow.trainer.continual_trainer import MoLEContinualTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(graphs: bool, nan_images: list[int], fused: bool = False,
           ahead: Optional[precompile.CompileAhead] = None) -> tuple[MoLEContinualTrainer, list]:
    """Two tasks on the GPU (with ``ahead``: the run's compile-ahead child, started and waited for
    as the runner does)."""
    device = torch.device("cuda")
    cfg = _config(graphs)
    with fusion.fusion(fused):
        torch.manual_seed(0)
        model = build_flow(cfg, 32).to(device)
        trainer = build_trainer(cfg, model, device, logging.getLogger("test_cuda_graphs"))
        assert trainer.strategy.graphs == graphs
        stats = []
        for task in range(2):
            patches = torch.randn(10, 6, 6, 32, generator=torch.Generator().manual_seed(task)) + task
            for i in nan_images:
                patches[i, 0, 0, 0] = float("nan")
            feats = FeatureSet(patches.to(device), patches.mean(dim=(1, 2)), torch.zeros(10, dtype=torch.long), None)
            if ahead is not None:
                ahead.before_task(task, (4, 6, 6, 32))
            stats.append(trainer.train_task(task, feats))
    return trainer, stats


def _config(graphs: bool = True) -> AblationConfig:
    return AblationConfig(feature_dim=32, lora_rank=4, num_coupling_layers=2, num_epochs=3, batch_size=4,
                          max_skip_fraction=0.6, cuda_graphs=graphs, compile_flow=True)


@pytest.mark.parametrize("nan_images", [[], [3]])
def test_recorded_step_equals_eager_step(nan_images: list[int], caplog: pytest.LogCaptureFixture) -> None:
    eager, eager_stats = _train(graphs=False, nan_images=nan_images)
    with caplog.at_level(logging.WARNING, logger="test_cuda_graphs"):
        graphed, graphed_stats = _train(graphs=True, nan_images=nan_images)
    assert "recording failed" not in caplog.text  # the graph was really recorded and replayed
    for a, b in zip(eager_stats, graphed_stats):
        assert (a.steps, a.skipped_batches, a.final_loss) == (b.steps, b.skipped_batches, b.final_loss)
    for (name, a), (_, b) in zip(eager.model.state_dict().items(), graphed.model.state_dict().items()):
        assert torch.equal(a, b), name


def _three_task_model(shared_too: bool) -> torch.nn.Module:
    """A small flow on the GPU with 3 tasks whose parameters (and the shared ones, if asked) are
    perturbed away from their initial values, so the experts really differ."""
    cfg = AblationConfig(feature_dim=32, lora_rank=4, num_coupling_layers=2)
    torch.manual_seed(0)
    model = build_flow(cfg, 32).cuda()
    for _ in range(3):
        model.add_task()
    params = model.parameters() if shared_too else [p for t in range(3) for p in model.task_parameters(t)]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_mixed_expert_scoring_on_gpu() -> None:
    """A routed batch of mixed experts in one pass scores each image as its own expert would."""
    from moleflow.evaluation.evaluator import score_patches
    model = _three_task_model(shared_too=False)
    x = torch.randn(12, 6, 6, 32, device="cuda")
    ids = torch.tensor([2, 0, 1, 1, 2, 0, 0, 1, 2, 2, 1, 0])
    mixed = score_patches(model, x, ids, batch_size=12, device=torch.device("cuda"))
    alone = torch.cat([score_patches(model, x[i:i + 1], ids[i:i + 1], 1, torch.device("cuda")) for i in range(12)])
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-4)


def test_compiled_recorded_training_matches_eager(caplog: pytest.LogCaptureFixture) -> None:
    """--compile_flow: the fused kernels inside the recorded step train as the eager step does, to
    float tolerance (Inductor's tanh and exp round differently), and the graph is still recorded."""
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, eager_stats = _train(graphs=False, nan_images=[])
    with caplog.at_level(logging.WARNING, logger="test_cuda_graphs"):
        fused, fused_stats = _train(graphs=True, nan_images=[], fused=True)
    assert "recording failed" not in caplog.text
    for a, b in zip(eager_stats, fused_stats):
        assert (a.steps, a.skipped_batches) == (b.steps, b.skipped_batches)
        assert abs(a.final_loss - b.final_loss) < 1e-3 * max(1.0, abs(a.final_loss))
    for (name, a), (_, b) in zip(eager.model.state_dict().items(), fused.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_the_compile_ahead_child_fills_the_cache_that_task_1_loads(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path) -> None:
    """--compile_flow from empty compile caches: the child compiles task 1's training step while
    task 0 trains, and the run's own compile at task 1 finds every graph in the on-disk cache."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    torch.backends.cuda.matmul.allow_tf32 = False
    fusion.reset_compiled()
    counters.clear()
    ahead = precompile.CompileAhead(_config(), torch.device("cuda"), logging.getLogger("test_cuda_graphs"))
    _train(graphs=True, nan_images=[], fused=True, ahead=ahead)
    assert ahead.report is not None
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    assert counters["inductor"]["fxgraph_cache_miss"] == 0 and hits >= 4, dict(counters)


@pytest.mark.parametrize("per_image", [False, True])
def test_compiled_flow_matches_eager(per_image: bool) -> None:
    """Inductor-compiled passes (scores and training gradients) equal the eager ones to float tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _three_task_model(shared_too=True)
    x = torch.randn(6, 6, 6, 32, device="cuda")
    task = torch.tensor([2, 0, 1, 1, 2, 0], device="cuda") if per_image else 1
    with torch.no_grad():
        plain = model(x, task)
        with fusion.fusion(True):
            fused = model(x, task)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if per_image:
        return
    params = model.task_parameters(1)

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        moleflow_loss(*model(x, 1)).backward()
        return [p.grad.clone() for p in params]

    plain_grads = grads()
    with fusion.fusion(True):
        fused_grads = grads()
    for a, b in zip(plain_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("channels", [512, 1024])
def test_amp_window_pooling_on_gpu_equals_unfold_and_pool(channels: int) -> None:
    """The amp extractor pools bfloat16 maps with TF32 window-sum convolutions: equal to unfold +
    channel pool in float64 to float32 rounding."""
    import torch.nn.functional as F
    from moleflow.extractors.base import channel_pool
    from moleflow.extractors.cnn_extractor import CNNPatchCoreExtractor
    fmap = torch.randn(3, channels, 28 * 512 // channels, 28 * 512 // channels, device="cuda").bfloat16()
    fmap = fmap.contiguous(memory_format=torch.channels_last)
    grid = tuple(fmap.shape[-2:])
    got = CNNPatchCoreExtractor.aggregate([fmap], grid, 768)
    x = fmap.double().cpu()
    pooled = channel_pool(F.unfold(x, 3, padding=1).transpose(1, 2), 768)  # (B, h*w, D)
    expected = pooled.reshape(x.shape[0], *grid, 768)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=2e-6)


def test_amp_stage_maps_pool_to_the_same_features_whatever_their_neighbours() -> None:
    """With amp on a GPU the cache keeps bfloat16 stage maps and pools them on reading: an image's
    features are bit-identical whichever images share its pooling chunk, and equal to the features of
    the unchunked pooling up to float32 rounding."""
    from moleflow.extractors.cnn_extractor import CNNPatchCoreExtractor
    extractor = CNNPatchCoreExtractor("wide_resnet50_2", 768, 224, weights="random", amp=True).cuda()
    images = torch.randn(40, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
    rows = extractor.stored(images)
    assert extractor.keeps_maps(images.device) and rows.dtype == torch.bfloat16
    assert rows.shape == (40, extractor.stored_row(images.device)[0][0])
    pooled = extractor.from_stored(rows)
    alone = torch.cat([extractor.from_stored(rows[i:i + 1]) for i in range(len(rows))])
    shifted = extractor.from_stored(rows[3:])
    assert torch.equal(alone, pooled) and torch.equal(shifted, pooled[3:])
    assert torch.equal(extractor(images), pooled)
    with torch.inference_mode(), extractor._autocast(images):
        unchunked = extractor._extract(images).float()
    torch.testing.assert_close(pooled, unchunked, rtol=1e-5, atol=1e-5)


def test_amp_feature_sets_give_an_image_the_same_bits_in_any_batch() -> None:
    """Feature sets run the backbone on fixed chunks of images: with amp on a GPU an image's stored
    row does not depend on the images beside it."""
    from moleflow.extractors.cnn_extractor import CNNPatchCoreExtractor
    from moleflow.extractors.features import stored_rows
    extractor = CNNPatchCoreExtractor("wide_resnet50_2", 768, 224, weights="random", amp=True).cuda()
    images = torch.randn(40, 3, 224, 224, generator=torch.Generator().manual_seed(1)).cuda()
    rows = stored_rows(extractor, images)
    assert torch.equal(stored_rows(extractor, images[3:]), rows[3:])
    assert torch.equal(stored_rows(extractor, images[::3]), rows[::3])
