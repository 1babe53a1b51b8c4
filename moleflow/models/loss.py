"""Training losses and patch scores, as pure functions of (z, log|det J|). All values in nats."""

from __future__ import annotations

import math

from torch import Tensor

from moleflow.models.fusion import fusable


@fusable
def patch_nll(z: Tensor, log_det: Tensor) -> Tensor:
    """Negative log-likelihood per patch under N(0, I): 1/2 |z|^2 + D/2 log(2 pi) - log|det J|.

    Args:
        z: (B, H, W, D) latent.
        log_det: (B, H, W) log|det J| per patch.

    Returns:
        (B, H, W) NLL in nats (also the patch anomaly score).
    """
    dim = z.shape[-1]
    return 0.5 * z.pow(2).sum(dim=-1) + 0.5 * dim * math.log(2 * math.pi) - log_det


def tail_k(num_patches: int, ratio: float) -> int:
    """k = max(1, floor(num_patches * ratio))."""
    return max(1, int(math.floor(num_patches * ratio)))


@fusable
def moleflow_loss(z: Tensor, log_det: Tensor, tail_weight: float = 0.7, tail_ratio: float = 0.02,
                  lambda_logdet: float = 1e-4, tail_aware: bool = True) -> Tensor:
    """L = (1 - w) mean_p l_p + w mean_b(top-k mean of l in image b) + lambda mean_p (log|det J_p|)^2.

    Without the tail term (``tail_aware=False``): L = mean_p l_p + lambda mean_p (log|det J_p|)^2,
    the same scale as the tail-aware loss.

    Args:
        z: (B, H, W, D).
        log_det: (B, H, W).
        tail_weight: w.
        tail_ratio: fraction of patches per image in the tail (k = max(1, floor(H W ratio))).
        lambda_logdet: weight of the log-det regulariser.
        tail_aware: use the tail term.

    Returns:
        scalar loss.
    """
    nll = patch_nll(z, log_det)
    mean_term = nll.mean()
    reg = lambda_logdet * log_det.pow(2).mean()
    if not tail_aware:
        return mean_term + reg
    flat = nll.flatten(1)
    k = tail_k(flat.shape[1], tail_ratio)
    tail = flat.topk(k, dim=1).values.mean(dim=1).mean()
    return (1.0 - tail_weight) * mean_term + tail_weight * tail + reg
