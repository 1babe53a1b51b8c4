"""The argparse parser, generated from AblationConfig so flags and fields can never drift apart.

Every field ``name`` becomes ``--name``; a boolean gets an exclusive pair: ``use_X`` -> ``--use_X`` /
``--no_X``, any other ``X`` -> ``--X`` / ``--no_X``. Nothing is stored for a flag that was not given:
that is how presets and the demo know what the user set. No torch or data stack is imported here or
in ``config/ablation.py``, so ``--help`` and setting errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Optional, Sequence

from moleflow.config.ablation import (
    DEMO_SETTINGS, PRESETS, AblationConfig, ConfigError, apply_overrides, config_fields,
)
from moleflow.config.help_text import HELP, METAVARS

class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump) and exit with status 2."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102
        self.exit(2, f"error: {message} (see --help)\n")


def _flag_names(name: str) -> tuple[str, str]:
    base = name[4:] if name.startswith("use_") else name
    return f"--{name}", f"--no_{base}"


def build_parser(only: Optional[Sequence[str]] = None, prog: str = "run_moleflow.py",
                 description: str = "MoLE-Flow: continual anomaly detection with LoRA experts in a normalizing flow.",
                 ) -> argparse.ArgumentParser:
    """Build the CLI parser from the AblationConfig fields (``only``: just those, e.g. the settings a
    re-evaluation may change)."""
    parser = OneLineParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(AblationConfig)
    for name, fld in config_fields().items():
        if only is not None and name not in only:
            continue
        kind = hints[name]
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
        help_text = HELP[name] if kind == list[str] else f"{HELP[name]} (default: {default})"
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
            parser.add_argument(f"--{name}", type=base, help=help_text, metavar=METAVARS.get(name, name.upper()))
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> tuple[AblationConfig, dict[str, Any]]:
    """Turn argv into a validated AblationConfig.

    Returns:
        (config, explicit) where ``explicit`` holds the flags the user gave.
    """
    explicit = vars(build_parser().parse_args(argv))
    return resolve_config(explicit), explicit


def resolve_config(explicit: dict[str, Any]) -> AblationConfig:
    """defaults < demo settings < preset < explicit flags, then validation and conflict checks.

    Flags that mean nothing because of the preset (``--lora_rank`` under ``wo_lora``) are not
    applied (see :func:`preset_ignored_flags`). Without ``--task_classes``, ``--dataset visa``,
    ``mpdd`` and ``folder`` get their own class list (``moleflow.data.default_task_classes``).
    """
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
    ignored = preset_ignored_flags(explicit)
    config = apply_overrides(config, {k: v for k, v in explicit.items() if k not in ignored})
    _check_conflicts(config, explicit, ignored)
    config = config.validate()
    if not ({"task_classes", "demo", "resume"} & set(explicit)) and config.dataset != "mvtec":
        from pathlib import Path
        from moleflow.data import default_task_classes
        config = apply_overrides(config, {"task_classes": default_task_classes(config.dataset, Path(config.data_path))})
    return config


# flag -> (setting, the value it must have for the flag to matter)
_DEPENDS_ON: dict[str, tuple[str, Any]] = {
    "lora_rank": ("use_lora", True), "lora_alpha": ("use_lora", True),
    "dia_n_blocks": ("use_dia", True), "dia_hidden_ratio": ("use_dia", True),
    "scale_context_kernel": ("use_scale_context", True),
    "spatial_context_kernel": ("use_spatial_context", True),
    "tail_weight": ("use_tail_aware_loss", True), "tail_top_k_ratio": ("use_tail_aware_loss", True),
    "slow_blocks_k": ("enable_slow_stage", True), "slow_lr_ratio": ("enable_slow_stage", True),
    "slow_stage_start": ("enable_slow_stage", True),
    "use_mahalanobis": ("use_router", True),
    "use_whitening_adapter": ("use_task_adapter", True),
    "score_aggregation_top_k": ("score_aggregation_mode", "top_k"),
    "score_aggregation_percentile": ("score_aggregation_mode", "percentile"),
    "enable_slow_stage": ("freeze_base", True),
    "compile_ahead": ("compile_flow", True),
    "memory_size": ("anomaly_score", ("memory", "fused")),
    "memory_weight": ("anomaly_score", "fused"),
    "feature_cache": ("use_feature_cache", True), "feature_cache_max_gb": ("use_feature_cache", True),
}


def _meets(value: Any, needed: Any) -> bool:
    """``value`` is the one ``needed`` (or one of them, when ``needed`` is a tuple)."""
    return value in needed if isinstance(needed, tuple) else value == needed


def _as_flag(name: str, value: Any) -> str:
    """The command-line spelling of setting ``name`` at ``value`` ('--no_lora', '--score_aggregation_mode max')."""
    if isinstance(value, bool):
        on, off = _flag_names(name)
        return on if value else off
    return f"--{name} {value}"


def _given(flag: str, explicit: dict[str, Any]) -> bool:
    """The user gave ``flag`` in a way that needs its setting (a SLOW stage turned off needs nothing)."""
    return flag in explicit and (flag != "enable_slow_stage" or bool(explicit[flag]))


def preset_ignored_flags(explicit: dict[str, Any]) -> dict[str, str]:
    """Explicit flags that mean nothing because of ``--ablation_preset`` (not because of a switch the
    user typed): ``{flag: one-line warning}``. They are ignored, so that shared flags (``run.sh``'s
    ``EXTRA``) work with every preset; the run records them in config.json."""
    preset = explicit.get("ablation_preset", "full")
    settings = PRESETS.get(preset, {})
    ignored: dict[str, str] = {}
    for flag, (setting, needed) in _DEPENDS_ON.items():
        if _given(flag, explicit) and setting not in explicit and setting in settings \
                and not _meets(settings[setting], needed):
            ignored[flag] = (f"--{flag} has no effect under --ablation_preset {preset} (it sets "
                             f"{_as_flag(setting, settings[setting])}); ignored")
    return ignored


def _check_conflicts(config: AblationConfig, explicit: dict[str, Any], ignored: dict[str, str]) -> None:
    """Refuse a flag that would be parsed and then ignored (other than those the preset makes moot)."""
    for flag, (setting, needed) in _DEPENDS_ON.items():
        if flag in ignored or not _given(flag, explicit) or _meets(getattr(config, setting), needed):
            continue
        now = _as_flag(setting, getattr(config, setting))
        if setting == "freeze_base":
            raise ConfigError(f"--{flag} needs a frozen base; drop {now} or drop --{flag}")
        if isinstance(needed, bool):
            raise ConfigError(f"--{flag} has no effect with {now}; drop --{flag} or use {_as_flag(setting, needed)}")
        wanted = " or ".join(_as_flag(setting, v) for v in (needed if isinstance(needed, tuple) else (needed,)))
        raise ConfigError(f"--{flag} needs {wanted} (now {now}); drop --{flag} or use {wanted}")
    if "threshold_quantile" in explicit and config.val_fraction == 0:
        raise ConfigError("--threshold_quantile has no effect with --val_fraction 0 (no held-out images, no "
                          "threshold); drop --threshold_quantile or use --val_fraction > 0")

