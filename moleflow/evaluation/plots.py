"""Flow-analysis plots and routing tables written to ``<experiment>/diagnostics/``.

Every function takes numpy arrays and an output path and writes one PNG (or CSV). Figures are
built with ``matplotlib.figure.Figure`` and the Agg canvas, so nothing touches pyplot's global
state or needs a display.
"""

from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
_GOOD_DEFECT = ((0, "good (label 0)", "tab:blue"), (1, "defect (label 1)", "tab:red"))


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_latent_vs_gaussian(z_samples: np.ndarray, path: str | os.PathLike) -> None:
    """Histogram of pooled latent coordinates ``z_samples`` (any shape, flattened) against the N(0, 1)
    pdf, plus a QQ plot."""
    z = np.asarray(z_samples, dtype=np.float64).ravel()
    z = z[np.isfinite(z)]
    if z.size == 0:
        raise ValueError("plot_latent_vs_gaussian needs at least one finite latent value")
    fig = _new_figure(11, 4.5)
    ax_hist, ax_qq = fig.subplots(1, 2)
    lim = max(4.0, float(np.quantile(np.abs(z), 0.999)))
    ax_hist.hist(z, bins=120, range=(-lim, lim), density=True, color="tab:blue", alpha=0.6,
                 label=f"latent z (n={z.size:,})")
    grid = np.linspace(-lim, lim, 400)
    ax_hist.plot(grid, stats.norm.pdf(grid), color="black", lw=2, label="N(0, 1) pdf")
    ax_hist.set(xlabel="latent coordinate z (standard units)", ylabel="density (1 / unit)",
                title=f"Latent vs N(0,1): mean {z.mean():.3f}, std {z.std():.3f}, "
                      f"skew {stats.skew(z):.2f}, ex. kurt {stats.kurtosis(z):.2f}")
    ax_hist.legend()
    probs = (np.arange(1, 1001) - 0.5) / 1000
    ax_qq.plot(stats.norm.ppf(probs), np.quantile(z, probs), ".", ms=3, color="tab:blue",
               label="latent quantiles")
    ref = np.array([-4.0, 4.0])
    ax_qq.plot(ref, ref, "k--", lw=1, label="y = x (perfect Gaussian)")
    ax_qq.set(xlabel="N(0, 1) quantile (standard units)", ylabel="latent quantile (standard units)",
              title="QQ plot against N(0, 1)")
    ax_qq.legend()
    _save(fig, path)


def plot_logdet_spread(logdet_per_image: np.ndarray, path: str | os.PathLike) -> None:
    """Spread of ``logdet_per_image`` ``(N,)`` (log|det J| per image, nats): histogram and values in image order."""
    values = np.asarray(logdet_per_image, dtype=np.float64).ravel()
    fig = _new_figure(11, 4.5)
    ax_hist, ax_seq = fig.subplots(1, 2)
    ax_hist.hist(values, bins=min(50, max(5, values.size // 4)), color="tab:green", alpha=0.7,
                 label=f"{values.size} images")
    ax_hist.axvline(values.mean(), color="black", ls="--", label=f"mean {values.mean():.3g}")
    ax_hist.set(xlabel="log|det J| per image (nats)", ylabel="number of images",
                title=f"Log-det spread: std {values.std():.3g}, "
                      f"range [{values.min():.3g}, {values.max():.3g}]")
    ax_hist.legend()
    ax_seq.plot(np.arange(values.size), values, ".", color="tab:green", label="image")
    ax_seq.axhline(values.mean(), color="black", ls="--", label="mean")
    ax_seq.set(xlabel="image index (test order)", ylabel="log|det J| (nats)", title="Log-det per image")
    ax_seq.legend()
    _save(fig, path)


def plot_znorm_vs_logdet(znorm: np.ndarray, logdet: np.ndarray, labels: np.ndarray,
                         path: str | os.PathLike) -> None:
    """Scatter of ``znorm`` ``(N,)`` (||z|| per image or patch, standard units) against ``logdet`` ``(N,)``
    (log|det J|, nats), coloured by the true ``labels`` ``(N,)`` (0 = good, 1 = defect)."""
    znorm, logdet = np.asarray(znorm, float).ravel(), np.asarray(logdet, float).ravel()
    labels = np.asarray(labels).ravel()
    fig = _new_figure(6.5, 5)
    ax = fig.subplots()
    for value, name, color in _GOOD_DEFECT:
        keep = labels == value
        ax.scatter(znorm[keep], logdet[keep], s=12, alpha=0.6, color=color,
                   label=f"{name}, n={int(keep.sum())}")
    ax.set(xlabel="||z|| (standard units)", ylabel="log|det J| (nats)", title="Latent norm vs log-determinant")
    ax.legend()
    _save(fig, path)


def plot_score_distributions(scores: np.ndarray, labels: np.ndarray, class_name: str,
                             path: str | os.PathLike) -> None:
    """Histograms of image scores ``(N,)`` (NLL, nats) split by the TRUE ``labels`` ``(N,)`` (0 = good,
    1 = defect); ``class_name`` in the title."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    bins = np.histogram_bin_edges(scores, bins=min(40, max(8, scores.size // 3)))
    fig = _new_figure(7, 4.5)
    ax = fig.subplots()
    for value, name, color in _GOOD_DEFECT:
        keep = labels == value
        if keep.any():
            ax.hist(scores[keep], bins=bins, alpha=0.55, color=color, label=f"{name}, n={int(keep.sum())}")
    ax.set(xlabel="image anomaly score (NLL, nats)", ylabel="number of images",
           title=f"{class_name}: score distribution by true label")
    ax.legend()
    _save(fig, path)


def _to_display(images: np.ndarray) -> np.ndarray:
    """``(N, 3, H, W)`` ImageNet-normalised floats or ``(N, H, W, 3)`` uint8 -> ``(N, H, W, 3)`` in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    if images.ndim == 4 and images.shape[1] == 3:
        hwc = images.astype(np.float64).transpose(0, 2, 3, 1)
        return np.clip(hwc * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)
    raise ValueError("images must be (N, 3, H, W) ImageNet-normalised floats or (N, H, W, 3) "
                     f"uint8, got shape {images.shape} dtype {images.dtype}")


def plot_anomaly_overlays(images: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                          titles: Sequence[str], path: str | os.PathLike) -> None:
    """One row per image: the image | anomaly-map overlay (one colour scale for all rows) | ground truth.

    Args:
        images: ``(N, 3, H, W)`` ImageNet-normalised or ``(N, H, W, 3)`` uint8.
        maps: ``(N, H, W)`` anomaly maps (nats).
        masks: ``(N, H, W)`` ground truth, non-zero = defect.
        titles: ``N`` row titles (e.g. file name and score).
    """
    rgb = _to_display(images)
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) != 0
    n = rgb.shape[0]
    if maps.shape != rgb.shape[:3] or masks.shape != rgb.shape[:3] or len(titles) != n:
        raise ValueError(f"images {rgb.shape[:3]}, maps {maps.shape}, masks {masks.shape} and "
                         f"{len(titles)} titles must agree on (N, H, W)")
    vmin, vmax = float(np.quantile(maps, 0.01)), float(np.quantile(maps, 0.999))
    fig = _new_figure(10, 3.2 * n)
    axes = np.asarray(fig.subplots(n, 3, squeeze=False))
    for i in range(n):
        ax_img, ax_map, ax_gt = axes[i]
        ax_img.imshow(rgb[i])
        ax_img.set_title(f"{titles[i]}: image", fontsize=9)
        ax_map.imshow(rgb[i])
        shown = ax_map.imshow(maps[i], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        ax_map.set_title("anomaly map overlay", fontsize=9)
        fig.colorbar(shown, ax=ax_map, fraction=0.046, label="anomaly score (nats)")
        ax_gt.imshow(rgb[i])
        if masks[i].any():
            ax_gt.contour(masks[i].astype(float), levels=[0.5], colors="lime", linewidths=1.5)
            ax_gt.set_title("ground truth (green contour)", fontsize=9)
        else:
            ax_gt.set_title("ground truth: no defect", fontsize=9)
        for ax in axes[i]:
            ax.set(xticks=[], yticks=[])
    _save(fig, path)


def _annotated_heatmap(fig: Figure, values: np.ndarray, task_names: Sequence[str], fmt: str,
                       cmap: str, vmin: float | None, vmax: float | None, colorbar_label: str):
    """Heatmap of a ``(T, T)`` array with every finite cell annotated; NaN cells stay blank."""
    ax = fig.subplots()
    shown = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    fig.colorbar(shown, ax=ax, label=colorbar_label, shrink=0.8)
    size = len(task_names)
    fontsize = 8 if size > 10 else 10
    ax.set_xticks(range(size), task_names, rotation=60, ha="right", fontsize=fontsize + 1)
    ax.set_yticks(range(size), task_names, fontsize=fontsize + 1)
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            red, green, blue, _ = shown.cmap(shown.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
    return ax


def plot_confusion_matrix(conf: np.ndarray, task_names: Sequence[str], path: str | os.PathLike) -> None:
    """Routing confusion matrix ``conf`` ``(T, T)`` of integer counts: rows true task, columns routed task,
    counts annotated."""
    conf = np.asarray(conf)
    size = len(task_names)
    if conf.shape != (size, size):
        raise ValueError(f"conf must be ({size}, {size}) for {size} tasks, got {conf.shape}")
    total = int(conf.sum())
    accuracy = np.trace(conf) / total if total else float("nan")
    fig = _new_figure(4 + 0.45 * size, 3.5 + 0.45 * size)
    ax = _annotated_heatmap(fig, conf.astype(np.float64), task_names, ".0f", "Blues", 0, None,
                            "number of test images")
    ax.set(xlabel="routed task (router's choice)", ylabel="true task",
           title=f"Routing confusion: accuracy {accuracy:.2%} of {total} images")
    _save(fig, path)


def plot_accuracy_matrix(R: np.ndarray, task_names: Sequence[str], metric_name: str,
                         path: str | os.PathLike) -> None:
    """Heatmap of the continual accuracy matrix ``R`` ``(T, T)``: ``metric_name`` on task j (column) after
    training task i (row); unmeasured (NaN) cells blank."""
    R = np.asarray(R, dtype=np.float64)
    size = len(task_names)
    if R.shape != (size, size):
        raise ValueError(f"R must be ({size}, {size}) for {size} tasks, got {R.shape}")
    fig = _new_figure(4 + 0.5 * size, 3.5 + 0.5 * size)
    ax = _annotated_heatmap(fig, R, task_names, ".3f", "viridis", None, None, metric_name)
    ax.set_yticks(range(size), [f"after {name}" for name in task_names],
                  fontsize=9 if size > 10 else 11)
    ax.set(xlabel="evaluated task", ylabel="after training task", title=f"Accuracy matrix: {metric_name}")
    _save(fig, path)


def save_confusion_csv(conf: np.ndarray, task_names: Sequence[str], path: str | os.PathLike) -> None:
    """Write the routing confusion matrix ``conf`` ``(T, T)`` of integer counts: header
    ``true\\routed, <names>``, one row per true task."""
    conf = np.asarray(conf)
    if conf.shape != (len(task_names), len(task_names)):
        raise ValueError(f"conf shape {conf.shape} does not match {len(task_names)} task names")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\routed", *task_names])
        for name, row in zip(task_names, conf):
            writer.writerow([name, *(int(v) for v in row)])
