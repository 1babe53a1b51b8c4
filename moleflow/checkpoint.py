"""Checkpoints: written atomically after every task, read back as data only (weights_only)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from moleflow.config.ablation import AblationConfig

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "moleflow-checkpoint-v2"  # v2: the DIA weights are dia.<task>.<block>.{s_net,t_net}

# Settings that fix the shape or meaning of the saved model; a resumed run must keep them.
ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "backbone_name", "backbone_weights", "feature_dim", "img_size", "num_coupling_layers", "dia_n_blocks",
    "lora_rank", "lora_alpha", "clamp_alpha", "dia_hidden_ratio", "scale_context_kernel",
    "spatial_context_kernel", "use_lora", "use_dia", "use_task_adapter", "use_whitening_adapter",
    "use_pos_embed", "use_spatial_context", "use_scale_context", "use_mahalanobis", "seed",
    "feature_strides", "feature_pooling", "resize_mode", "anomaly_score", "val_fraction", "threshold_quantile",
)
# What a setting missing from an older checkpoint's config was then (when not today's default):
# before --val_fraction existed every training image was trained on.
LEGACY_VALUES: dict[str, Any] = {"val_fraction": 0.0}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the requested run."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` via a temporary file, fsync and rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; free disk space "
                              f"or pass --log_dir on a writable disk") from err


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only; no code is unpickled)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; --resume needs an experiment folder that "
                              f"finished at least one task")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason[:120]}); resume from an "
                              f"intact copy or start a new run") from err
    if isinstance(data, dict) and data.get("format") == "moleflow-checkpoint-v1":
        raise CheckpointError(f"{path} was written by an older MoLE-Flow (format v1; its DIA weights are named "
                              f"differently); it cannot be resumed by this version: start a new run")
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a MoLE-Flow checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return data


def architecture_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of architecture settings that differ ('lora_rank: saved 64, now 8')."""
    defaults = AblationConfig().to_dict()  # a key an older checkpoint lacks: LEGACY_VALUES, else the default
    saved = {key: saved.get(key, LEGACY_VALUES.get(key, defaults[key])) for key in ARCHITECTURE_FIELDS}
    return [f"{key}: saved {saved[key]!r}, now {current.get(key)!r}"
            for key in ARCHITECTURE_FIELDS if saved[key] != current.get(key)]


def saved_config(checkpoint: dict[str, Any]) -> AblationConfig:
    """The settings a checkpoint was written with (a setting it lacks: ``LEGACY_VALUES``, else the default)."""
    return AblationConfig.from_dict({**LEGACY_VALUES, **dict(checkpoint["config"])})
