"""MoLE-Flow: continual anomaly detection with LoRA experts in a normalizing flow.

``moleflow.load("logs/<run>")`` gives a trained run ready for new images (``moleflow.api``); the
heavy libraries (torch, timm) are imported on that call, not by ``import moleflow``.
"""

from typing import Any

__version__ = "0.1.0"


def load(run_dir: Any, device: str = "auto", batch_size: Any = None) -> Any:
    """A trained run's folder -> ``moleflow.api.Model`` (``model.predict(images_or_paths)``)."""
    from moleflow.api import load as _load
    return _load(run_dir, device=device, batch_size=batch_size)
