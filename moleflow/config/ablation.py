"""AblationConfig: every setting of a run in one typed, validated dataclass.

Precedence when a run is configured from the command line:
dataclass defaults < ``--demo`` settings < ``--ablation_preset`` < explicit flags.
The defaults are the main configuration of SPEC §2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional

MVTEC_CLASSES: list[str] = [
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
]

# Patch anomaly score: the flow's NLL (paper), the per-task patch memory's distance alone, or both
# standardised and averaged (moleflow/models/memory.py).
ANOMALY_SCORES: tuple[str, ...] = ("flow", "memory", "fused")


class ConfigError(ValueError):
    """A setting or a combination of settings that cannot run; the message names the fix."""


@dataclass
class AblationConfig:
    """All settings of one MoLE-Flow run. Field names are the CLI flag names."""

    # --- data ---
    dataset: str = "mvtec"
    data_path: str = "./data/MVTecAD"
    task_classes: list[str] = field(default_factory=lambda: list(MVTEC_CLASSES))
    cl_scenario: str = "1-1"
    img_size: int = 224
    resize_mode: str = "crop"
    use_augmentation: bool = False
    val_fraction: float = 0.1
    # --- backbone ---
    backbone_name: str = "wide_resnet50_2"
    backbone_weights: Optional[str] = None
    feature_dim: int = 0
    feature_strides: list[int] = field(default_factory=lambda: [4, 8, 16])
    feature_pooling: str = "avg"
    # --- feature cache (the backbone's output per image, reused by later runs) ---
    use_feature_cache: bool = True
    feature_cache: Optional[str] = None
    feature_cache_max_gb: float = 40.0
    # --- flow ---
    num_coupling_layers: int = 6
    dia_n_blocks: int = 2
    lora_rank: int = 64
    lora_alpha: float = 1.0
    clamp_alpha: float = 1.9
    dia_hidden_ratio: float = 0.5
    scale_context_kernel: int = 5
    spatial_context_kernel: int = 3
    # --- module switches (SPEC §2: all on) ---
    use_lora: bool = True
    use_dia: bool = True
    use_task_adapter: bool = True
    use_whitening_adapter: bool = True
    use_router: bool = True
    use_mahalanobis: bool = True
    use_pos_embed: bool = True
    use_spatial_context: bool = True
    use_scale_context: bool = True
    freeze_base: bool = True
    # --- training ---
    num_epochs: int = 60
    lr: float = 3e-4
    batch_size: int = 16
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    warmup_epochs: int = 2
    max_skip_fraction: float = 0.05
    # --- loss ---
    use_tail_aware_loss: bool = True
    tail_weight: float = 0.7
    tail_top_k_ratio: float = 0.02
    lambda_logdet: float = 1e-4
    # --- scoring ---
    score_aggregation_mode: str = "top_k"
    score_aggregation_top_k: int = 3
    score_aggregation_percentile: float = 99.0
    anomaly_map_sigma: float = 4.0
    anomaly_score: str = "fused"
    memory_size: int = 10000
    memory_weight: float = 0.7
    threshold_quantile: float = 0.99
    # --- SLOW stage ---
    enable_slow_stage: bool = False
    slow_blocks_k: int = 2
    slow_lr_ratio: float = 0.2
    slow_stage_start: float = 0.85
    # --- evaluation / output ---
    eval_oracle: bool = True
    run_diagnostics: bool = False
    quiet: bool = False
    log_dir: str = "logs"
    experiment_name: str = "moleflow"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    amp: bool = False
    tf32: bool = False
    cuda_graphs: bool = True
    compile_flow: bool = False
    compile_ahead: bool = True
    resume: Optional[str] = None
    ablation_preset: str = "full"
    demo: bool = False

    def validate(self) -> "AblationConfig":
        """Check values and combinations; raise ConfigError naming the fix."""
        _check(self.dataset in ("mvtec", "visa", "mpdd", "folder"),
               f"--dataset {self.dataset!r} is unknown; use one of mvtec, visa, mpdd, folder")
        _check(len(self.task_classes) > 0, "--task_classes is empty; name at least one class")
        dupes = sorted({c for c in self.task_classes if self.task_classes.count(c) > 1})
        _check(not dupes, f"--task_classes repeats {dupes}; name each class once")
        _check(self.img_size >= 32, f"--img_size {self.img_size} is too small; use >= 32")
        _check(self.feature_dim == 0 or (self.feature_dim % 4 == 0 and self.feature_dim >= 8),
               f"--feature_dim {self.feature_dim} must be 0 (auto) or a multiple of 4 >= 8 (2-D positional encoding)")
        _check(self.num_coupling_layers >= 1, "--num_coupling_layers must be >= 1")
        _check(self.dia_n_blocks >= 1, "--dia_n_blocks must be >= 1 (use --no_dia to remove DIA)")
        _check(self.lora_rank >= 1, "--lora_rank must be >= 1 (use --no_lora to remove LoRA)")
        _check(self.num_epochs >= 1, f"--num_epochs {self.num_epochs} must be >= 1")
        _check(self.batch_size >= 1, f"--batch_size {self.batch_size} must be >= 1")
        _check(self.lr > 0, f"--lr {self.lr} must be > 0")
        _check(self.optimizer in ("adamw", "adam"), f"--optimizer {self.optimizer!r}: use adamw or adam")
        _check(0.0 <= self.tail_weight <= 1.0, f"--tail_weight {self.tail_weight} must be in [0, 1]")
        _check(0.0 < self.tail_top_k_ratio <= 1.0, "--tail_top_k_ratio must be in (0, 1]")
        _check(self.score_aggregation_mode in ("top_k", "max", "mean", "percentile"),
               f"--score_aggregation_mode {self.score_aggregation_mode!r}: use top_k, max, mean or percentile")
        _check(self.score_aggregation_top_k >= 1, "--score_aggregation_top_k must be >= 1")
        _check(len(self.feature_strides) > 0 and all(s > 0 for s in self.feature_strides)
               and len(set(self.feature_strides)) == len(self.feature_strides),
               f"--feature_strides {self.feature_strides}: name one or more distinct positive strides, e.g. 8 16")
        _check(self.feature_pooling in ("unfold", "avg"),
               f"--feature_pooling {self.feature_pooling!r}: use unfold (3x3 neighbourhoods, stages averaged) "
               "or avg (3x3 means, stages concatenated)")
        _check(0.0 <= self.score_aggregation_percentile <= 100.0,
               f"--score_aggregation_percentile {self.score_aggregation_percentile} must be in [0, 100]")
        _check(self.anomaly_map_sigma >= 0, f"--anomaly_map_sigma {self.anomaly_map_sigma} must be >= 0 (0 = no blur)")
        for flag, value in (("weight_decay", self.weight_decay), ("lambda_logdet", self.lambda_logdet),
                            ("warmup_epochs", self.warmup_epochs), ("num_workers", self.num_workers)):
            _check(value >= 0, f"--{flag} {value} must be >= 0")
        for flag, value in (("grad_clip", self.grad_clip), ("clamp_alpha", self.clamp_alpha),
                            ("dia_hidden_ratio", self.dia_hidden_ratio), ("slow_lr_ratio", self.slow_lr_ratio)):
            _check(value > 0, f"--{flag} {value} must be > 0")
        _check(self.feature_cache_max_gb > 0,
               f"--feature_cache_max_gb {self.feature_cache_max_gb} must be > 0 (use --no_feature_cache for no cache)")
        _check(self.resize_mode in ("crop", "squash"),
               f"--resize_mode {self.resize_mode!r}: use crop (shorter side, centre crop) or squash (whole image)")
        _check(self.anomaly_score in ANOMALY_SCORES,
               f"--anomaly_score {self.anomaly_score!r}: use one of {', '.join(ANOMALY_SCORES)}")
        _check(self.memory_size >= 0, f"--memory_size {self.memory_size} must be >= 0 (0 keeps every patch)")
        _check(0.0 < self.memory_weight < 1.0,
               f"--memory_weight {self.memory_weight} must be in (0, 1); use --anomaly_score flow or memory "
               "for one score alone")
        _check(0.0 <= self.val_fraction < 0.5,
               f"--val_fraction {self.val_fraction} must be in [0, 0.5) (0 = train on every training image, "
               "no threshold)")
        _check(0.0 < self.threshold_quantile <= 1.0,
               f"--threshold_quantile {self.threshold_quantile} must be in (0, 1] (1 = the largest held-out score)")
        _check(self.scale_context_kernel % 2 == 1 and self.spatial_context_kernel % 2 == 1,
               "--scale_context_kernel and --spatial_context_kernel must be odd")
        _check(1 <= self.slow_blocks_k <= self.num_coupling_layers,
               f"--slow_blocks_k {self.slow_blocks_k} must be in [1, --num_coupling_layers={self.num_coupling_layers}]")
        _check(0.0 < self.slow_stage_start < 1.0, "--slow_stage_start must be in (0, 1)")
        _check(0.0 <= self.max_skip_fraction < 1.0, "--max_skip_fraction must be in [0, 1)")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        name = self.experiment_name
        _check(bool(name) and "/" not in name and "\\" not in name and ".." not in name and not name.startswith("."),
               f"--experiment_name {name!r} must be a plain folder name (no '/', '\\', '..' or leading '.')")
        _check(self.ablation_preset in PRESETS,
               f"--ablation_preset {self.ablation_preset!r} is unknown; valid: {', '.join(PRESETS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AblationConfig":
        """Settings from a plain dict such as ``to_dict`` gives; keys this version does not know are
        dropped (a config saved by another version), missing ones keep their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# The paper's patch features: 3x3 neighbourhoods of the stride-8 and stride-16 stages pooled to
# D = 768 and averaged.
PAPER_FEATURES: dict[str, Any] = {"feature_pooling": "unfold", "feature_strides": [8, 16], "feature_dim": 768}

# Presets are plain data: field -> value. Explicit flags given with a preset still win.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "wo_lora": {"use_lora": False},
    "wo_router": {"use_router": False},
    "wo_adapter": {"use_task_adapter": False},
    "wo_pos_embed": {"use_pos_embed": False},
    "wo_dia": {"use_dia": False},
    "wo_spatial_context": {"use_spatial_context": False},
    "wo_scale_context": {"use_scale_context": False},
    "wo_tail_loss": {"use_tail_aware_loss": False},
    "wo_router_adapter": {"use_router": False, "use_task_adapter": False},
    "lora_only": {"use_router": False, "use_task_adapter": False, "use_dia": False},
    # A plain shared flow fine-tuned task after task (no per-task parameters at all).
    "baseline_nf": {
        "use_lora": False, "use_router": False, "use_task_adapter": False, "use_pos_embed": False,
        "use_dia": False, "use_spatial_context": False, "use_scale_context": False, "freeze_base": False,
    },
    # The paper's main configuration exactly (SPEC §2): its patch features and the flow's score alone.
    "paper_main": {**PAPER_FEATURES, "anomaly_score": "flow"},
    # Each change of ours over the paper, taken away alone (docs/accuracy.md).
    "wo_memory": {"anomaly_score": "flow"},
    "paper_features": dict(PAPER_FEATURES),
    "wo_stride4": {"feature_strides": [8, 16]},
    "whole_image": {"resize_mode": "squash"},
    # Per-class PatchCore upper bound, as PatchCore builds it: 3x3 means of the stride-8 and stride-16
    # stages concatenated, every training patch kept, k = 1, image score = max patch distance, the task
    # known; the flow is not trained.
    "patchcore_oracle": {"anomaly_score": "memory", "memory_size": 0, "use_router": False,
                         "score_aggregation_mode": "max", "feature_pooling": "avg", "feature_strides": [8, 16],
                         "feature_dim": 0},
}

# The embedded demo: generated data, the offline ImageNet backbone, sizes for 2 CPU cores.
DEMO_SETTINGS: dict[str, Any] = {
    "dataset": "folder", "data_path": "./data/moleflow_demo", "backbone_name": "efficientnet_lite0",
    "img_size": 160, "lora_rank": 16, "num_epochs": 12, "batch_size": 8, "lr": 1e-3, "experiment_name": "demo",
}


def config_fields() -> dict[str, dataclasses.Field]:
    """Name -> dataclass field of AblationConfig."""
    return {f.name: f for f in fields(AblationConfig)}


def apply_overrides(config: AblationConfig, overrides: dict[str, Any]) -> AblationConfig:
    """Return a copy of ``config`` with ``overrides`` applied; unknown keys are an error."""
    known = config_fields()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid settings are the AblationConfig fields")
    return dataclasses.replace(config, **overrides)
