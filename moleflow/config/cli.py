"""The argparse parser, generated from AblationConfig so flags and fields can never drift apart.

Every dataclass field ``name`` becomes ``--name``. Boolean switches get a pair:
``use_X`` -> ``--use_X`` / ``--no_X``; any other boolean ``X`` -> ``--X`` / ``--no_X``.
The two flags of a pair are mutually exclusive. Nothing is stored for a flag that was not
given, which is how presets and the demo know what the user set explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Optional, Sequence

from moleflow.config.ablation import (
    DEMO_SETTINGS, PRESETS, AblationConfig, ConfigError, apply_overrides, config_fields,
)

HELP: dict[str, str] = {
    "dataset": "dataset layout: mvtec, visa (split_csv/1cls.csv), mpdd, folder (any MVTec-layout folder)",
    "data_path": "dataset root folder",
    "task_classes": "classes in task order (default: all 15 MVTec AD classes)",
    "cl_scenario": "B-I: first task takes B classes, each later task I classes (1-1, 14-1, 10-5, 3-3)",
    "backbone_name": "timm backbone (CNN via feature_info, ViT via forward_intermediates); "
                     "efficientnet_lite0 loads offline ImageNet weights",
    "backbone_weights": "local state-dict file for the backbone (instead of downloading)",
    "feature_dim": "D, the patch-feature width the flow models",
    "feature_strides": "strides (px) of the CNN stages whose maps make the patch features; the patch grid is "
                       "the stride-8 one",
    "feature_pooling": "unfold: each stage's 3x3 neighbourhood vectors pooled to D, stages averaged (paper); "
                       "avg: each channel's 3x3 mean, stages concatenated, then pooled to D",
    "num_coupling_layers": "shared MoLE coupling blocks",
    "dia_n_blocks": "per-task DIA coupling blocks",
    "lora_rank": "rank r of each LoRA expert",
    "ablation_preset": f"group of switches: {', '.join(PRESETS)}",
    "demo": "generate the embedded demo dataset (once) and run the main pipeline on it offline",
    "resume": "experiment folder to continue (interrupted run) or extend (new --task_classes)",
    "run_diagnostics": "write flow-analysis plots to <experiment>/diagnostics/",
    "eval_oracle": "after the last task, also evaluate with the true task id (final_results_oracle.csv)",
    "device": "auto, cpu, cuda or cuda:N",
    "amp": "bf16 autocast for the frozen backbone on CUDA",
    "tf32": "TF32 float32 matrix products in the flow on CUDA (faster; routing stays full float32)",
    "cuda_graphs": "on CUDA, record the training step once per task as a CUDA graph and replay it "
                   "(same kernels, no per-kernel Python launch); no effect on the CPU",
    "compile_flow": "on CUDA, fuse the flow's element-wise work with torch.compile (all scoring, and "
                    "training from the second task on; compiles once per block shape and mode, tens of seconds per run; "
                    "scores equal to float tolerance); no effect on the CPU",
    "compile_ahead": "with --compile_flow: while task 0 trains, a child process compiles the later tasks' training "
                     "step into torch's on-disk cache, so that task 1 does not wait ~10 s for it (results unchanged)",
    "freeze_base": "freeze shared flow weights after task 0 (off only in baseline_nf: naive fine-tuning)",
}


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump) and exit with status 2."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102
        self.exit(2, f"error: {message} (see --help)\n")


def _flag_names(name: str) -> tuple[str, str]:
    base = name[4:] if name.startswith("use_") else name
    return f"--{name}", f"--no_{base}"


def build_parser() -> argparse.ArgumentParser:
    """Build the CLI parser from the AblationConfig fields."""
    parser = OneLineParser(
        prog="run_moleflow.py",
        description="MoLE-Flow: continual anomaly detection with LoRA experts in a normalizing flow.",
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(AblationConfig)
    for name, fld in config_fields().items():
        kind = hints[name]
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
        help_text = f"{HELP.get(name, name.replace('_', ' '))} (default: {default})"
        if kind is bool:
            on, off = _flag_names(name)
            group = parser.add_mutually_exclusive_group()
            group.add_argument(on, dest=name, action="store_const", const=True, help=help_text)
            group.add_argument(off, dest=name, action="store_const", const=False, help=f"turn {on} off")
        elif kind == list[str]:
            parser.add_argument(f"--{name}", nargs="+", type=str, metavar="NAME", help=help_text)
        elif kind == list[int]:
            parser.add_argument(f"--{name}", nargs="+", type=int, metavar="N", help=help_text)
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            parser.add_argument(f"--{name}", type=base, help=help_text)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> tuple[AblationConfig, dict[str, Any]]:
    """Turn argv into a validated AblationConfig.

    Returns:
        (config, explicit) where ``explicit`` holds the flags the user gave.
    """
    args = build_parser().parse_args(argv)
    explicit = vars(args)
    return resolve_config(explicit), explicit


def resolve_config(explicit: dict[str, Any]) -> AblationConfig:
    """defaults < demo settings < preset < explicit flags, then validation and conflict checks."""
    config = AblationConfig()
    if explicit.get("demo"):
        from moleflow.data import DEMO_CLASSES
        config = apply_overrides(config, {**DEMO_SETTINGS, "task_classes": list(DEMO_CLASSES)})
        for key in ("data_path", "dataset"):
            if key in explicit:
                raise ConfigError(f"--demo uses its own generated data; drop --{key} or drop --demo")
    preset = explicit.get("ablation_preset", "full")
    if preset not in PRESETS:
        raise ConfigError(f"--ablation_preset {preset!r} is unknown; valid: {', '.join(PRESETS)}")
    config = apply_overrides(config, PRESETS[preset])
    config = apply_overrides(config, explicit)
    _check_conflicts(config, explicit)
    return config.validate()


# flag -> (switch that must be on for the flag to matter)
_DEPENDS_ON: dict[str, str] = {
    "lora_rank": "use_lora",
    "lora_alpha": "use_lora",
    "dia_n_blocks": "use_dia",
    "dia_hidden_ratio": "use_dia",
    "scale_context_kernel": "use_scale_context",
    "spatial_context_kernel": "use_spatial_context",
    "tail_weight": "use_tail_aware_loss",
    "tail_top_k_ratio": "use_tail_aware_loss",
    "slow_blocks_k": "enable_slow_stage",
    "slow_lr_ratio": "enable_slow_stage",
    "slow_stage_start": "enable_slow_stage",
    "use_mahalanobis": "use_router",
    "use_whitening_adapter": "use_task_adapter",
}


def _check_conflicts(config: AblationConfig, explicit: dict[str, Any]) -> None:
    """Refuse a flag that would be parsed and then ignored."""
    for flag, switch in _DEPENDS_ON.items():
        if flag in explicit and not getattr(config, switch):
            on, off = _flag_names(switch)
            raise ConfigError(f"--{flag} has no effect with {off}; drop --{flag} or use {on}")
    if "score_aggregation_top_k" in explicit and config.score_aggregation_mode != "top_k":
        raise ConfigError("--score_aggregation_top_k needs --score_aggregation_mode top_k")
    if "score_aggregation_percentile" in explicit and config.score_aggregation_mode != "percentile":
        raise ConfigError("--score_aggregation_percentile needs --score_aggregation_mode percentile")
    if config.enable_slow_stage and not config.freeze_base:
        raise ConfigError("--enable_slow_stage needs a frozen base; drop --no_freeze_base")


def main_error(message: str) -> typing.NoReturn:
    """Print a one-line error and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
