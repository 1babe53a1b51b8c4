"""The parts of a run built from its ``AblationConfig``: the one place that reads the config for
the layers below the runner (extractors, models, trainer, evaluation take plain values or a small
settings object)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import torch

from moleflow.config.ablation import AblationConfig, ConfigError
from moleflow.data import AnomalyDataset, Sample
from moleflow.evaluation.evaluator import ScoreSettings
from moleflow.extractors import FeatureExtractor, build_extractor
from moleflow.extractors.cache import FeatureCache, default_cache_dir, dtype_name, weights_digest
from moleflow.extractors.cache_files import disk_bytes
from moleflow.extractors.decoding import CHUNK, decode_workers, start_workers
from moleflow.extractors.features import EXTRACT_CHUNK
from moleflow.extractors.source import FeatureSource
from moleflow.models.mole_nf import MoLESpatialAwareNF
from moleflow.models.routing import PrototypeRouter
from moleflow.trainer.continual_trainer import MoLEContinualTrainer, TrainSettings

S = TypeVar("S")


def settings_from(cls: type[S], config: AblationConfig, **values: Any) -> S:
    """An instance of the settings dataclass ``cls`` with each field taken from the config setting of
    the same name (``values`` win)."""
    return cls(**{f.name: values.get(f.name, getattr(config, f.name)) for f in dataclasses.fields(cls)})


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (CUDA when present), cpu, cuda, cuda:N; CUDA asked for but absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def train_settings(config: AblationConfig) -> TrainSettings:
    return settings_from(TrainSettings, config)


def score_settings(config: AblationConfig) -> ScoreSettings:
    return settings_from(ScoreSettings, config)


def build_flow(config: AblationConfig, dim: int) -> MoLESpatialAwareNF:
    """The flow with the config's switches (a switched-off module is absent, not bypassed)."""
    adapter = ("whitening" if config.use_whitening_adapter else "film") if config.use_task_adapter else None
    return MoLESpatialAwareNF(
        dim=dim,
        num_coupling_layers=config.num_coupling_layers,
        lora_rank=config.lora_rank if config.use_lora else 0,
        lora_alpha=config.lora_alpha,
        clamp=config.clamp_alpha,
        scale_context_kernel=config.scale_context_kernel if config.use_scale_context else 0,
        spatial_context_kernel=config.spatial_context_kernel if config.use_spatial_context else 0,
        use_pos_embed=config.use_pos_embed,
        adapter=adapter,
        dia_n_blocks=config.dia_n_blocks if config.use_dia else 0,
        dia_hidden_ratio=config.dia_hidden_ratio,
        seed=config.seed,
    )


def build_backbone(config: AblationConfig, device: torch.device, weights: str = "pretrained") -> FeatureExtractor:
    """The frozen extractor on ``device`` (``weights='random'``: the benchmark's speed-only runs)."""
    return build_extractor(config.backbone_name, feature_dim=config.feature_dim, img_size=config.img_size,
                           weights=weights, weights_path=config.backbone_weights,
                           amp=config.amp and device.type == "cuda", strides=config.feature_strides,
                           pooling=config.feature_pooling).to(device)


def build_dataset(config: AblationConfig, samples: Sequence[Sample], augment: bool = False) -> AnomalyDataset:
    """The images (and masks) of ``samples`` at the config's size and resize mode."""
    return AnomalyDataset(samples, config.img_size, augment=augment, resize_mode=config.resize_mode)


def build_router(config: AblationConfig) -> PrototypeRouter:
    return PrototypeRouter(mahalanobis=config.use_mahalanobis)


def build_trainer(config: AblationConfig, model: MoLESpatialAwareNF, device: torch.device, log: logging.Logger,
                  progress: bool = False) -> MoLEContinualTrainer:
    return MoLEContinualTrainer(train_settings(config), model, device, log, progress)


def build_feature_cache(config: AblationConfig, extractor: FeatureExtractor, device: torch.device,
                        log: logging.Logger) -> Optional[FeatureCache]:
    """The feature cache of this backbone (None with ``--no_feature_cache``, or, with a warning, when
    its folder cannot be written)."""
    if not config.use_feature_cache:
        return None
    root = Path(config.feature_cache).expanduser() if config.feature_cache else default_cache_dir()
    shape, dtype = extractor.stored_row(device)  # what an entry holds, e.g. ``bfloat16 (602112,)``
    identity = {"backbone": config.backbone_name, "weights_sha256": weights_digest(extractor),
                "feature_dim": extractor.feature_dim, "grid": list(extractor.grid_size()),
                "feature_strides": list(config.feature_strides), "feature_pooling": config.feature_pooling,
                "amp": bool(extractor.amp and device.type == "cuda"), "device": device.type,
                "torch": torch.__version__, "stored": f"{dtype_name(dtype)} {tuple(shape)}",
                "extract_chunk": EXTRACT_CHUNK}
    try:
        cache = FeatureCache(root, identity, int(config.feature_cache_max_gb * 1e9), warn=log.warning)
        log.info(f"feature cache {root}: {len(cache.index.entries())} image(s), {disk_bytes(root) / 1e9:.3f} GB "
                 f"(bound --feature_cache_max_gb {config.feature_cache_max_gb:g})")
        return cache
    except OSError as error:
        log.warning(f"warning: the feature cache {root} cannot be written ({error}); this run extracts every image "
                    "(pass --feature_cache DIR with a writable folder, or --no_feature_cache)")
        return None


def build_feature_source(config: AblationConfig, extractor: FeatureExtractor, device: torch.device,
                         log: logging.Logger, progress: bool = False, images: int = 0) -> FeatureSource:
    """Features from the cache (if on), else decoded (on a thread pool, or by ``--num_workers``
    processes) and extracted; with more than a few ``images`` to come, the processes start now. New
    cache entries are written in the background: the caller flushes the source at the end."""
    cache = build_feature_cache(config, extractor, device, log)
    workers = decode_workers(config.num_workers)
    if workers and images > 2 * CHUNK:
        start_workers(workers)
    return FeatureSource(extractor, device, config.batch_size, workers, cache, progress, background=True)
