"""An MVTec-AD-sized synthetic dataset for speed measurements (MVTec layout, PNG images and masks).

As in MVTec AD: 15 classes, ~240 training and ~115 test images each (27 % of them good, the rest
with one of three defect kinds and an exact mask), square, side fixed per class in [700, 1024] px.
Each class has its own look (colours, grating, an object disc for some) so the router has something
to separate; only the sizes, counts, file format and decode cost are meant to be realistic.
Deterministic (a numpy Generator per image), written by a process pool into a temporary folder that
is renamed into place; skipped when a marker of the same settings is present.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MARKER = ".moleflow_bench_v1"
DEFECT_KINDS = ("spot", "scratch", "stain")
GOOD_FRACTION = 0.27  # MVTec AD test sets: 467 good of 1725 images
_LOW_RES = 96


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the synthetic dataset (image sides in px)."""

    num_classes: int = 15  # tasks in a 1-1 scenario
    n_train: int = 240  # good training images per class
    n_test: int = 115  # test images per class, good and defective
    min_px: int = 700
    max_px: int = 1024
    seed: int = 0  # of all randomness

    def class_names(self) -> list[str]:
        return [f"class_{i:02d}" for i in range(self.num_classes)]

    def side(self, class_index: int) -> int:
        """Image side of a class: spread over [min_px, max_px]."""
        if self.num_classes == 1:
            return self.max_px
        frac = ((class_index * 7) % self.num_classes) / (self.num_classes - 1)
        return int(round(self.min_px + frac * (self.max_px - self.min_px)))

    def stamp(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items()) + "\n"


@dataclass(frozen=True)
class _Job:
    folder: str
    class_index: int
    side: int
    stream: int  # 0 train, 1 test good, 2 test defect
    index: int
    defect: Optional[str]
    seed: int


def generate_synthetic_dataset(root: Path, spec: SyntheticSpec = SyntheticSpec(),
                               processes: Optional[int] = None) -> list[str]:
    """Write the dataset under ``root`` (MVTec layout) unless the same one is already there.

    Args:
        root: dataset folder (created; must be absent, empty or an earlier synthetic dataset).
        spec: sizes and seed.
        processes: worker processes (default: all CPUs).

    Returns:
        The class names, in task order.

    Raises:
        FileExistsError: ``root`` holds something else.
    """
    root = Path(root)
    marker = root / MARKER
    if marker.is_file() and marker.read_text() == spec.stamp():
        return spec.class_names()
    if root.exists() and not marker.is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a MoLE-Flow synthetic benchmark dataset; "
                              "pass another --data_path or remove it")
    partial = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    jobs = _jobs(partial, spec)
    processes = processes or os.cpu_count() or 1
    try:
        if processes > 1:
            with get_context("fork").Pool(processes) as pool:
                for _ in pool.imap_unordered(_write, jobs, chunksize=8):
                    pass
        else:
            for job in jobs:
                _write(job)
        (partial / MARKER).write_text(spec.stamp())
        if root.exists():
            shutil.rmtree(root)
        partial.rename(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return spec.class_names()


def _jobs(partial: Path, spec: SyntheticSpec) -> list[_Job]:
    jobs = []
    n_good = max(1, int(round(spec.n_test * GOOD_FRACTION)))
    n_defect = max(len(DEFECT_KINDS), spec.n_test - n_good)
    for c, name in enumerate(spec.class_names()):
        folder, side = str(partial / name), spec.side(c)
        jobs += [_Job(folder, c, side, 0, i, None, spec.seed) for i in range(spec.n_train)]
        jobs += [_Job(folder, c, side, 1, i, None, spec.seed) for i in range(n_good)]
        jobs += [_Job(folder, c, side, 2, i, DEFECT_KINDS[i % len(DEFECT_KINDS)], spec.seed) for i in range(n_defect)]
    return jobs


def _write(job: _Job) -> None:
    rng = np.random.default_rng([job.seed, job.class_index, job.stream, job.index])
    image = _render(rng, job.class_index, job.side)
    folder = Path(job.folder)
    if job.stream == 0:
        _save(image, folder / "train" / "good" / f"{job.index:03d}.png")
    elif job.stream == 1:
        _save(image, folder / "test" / "good" / f"{job.index:03d}.png")
    else:
        mask = _add_defect(rng, image, job.defect)
        _save(image, folder / "test" / job.defect / f"{job.index:03d}.png")
        _save(mask, folder / "ground_truth" / job.defect / f"{job.index:03d}_mask.png")


def _render(rng: np.random.Generator, class_index: int, side: int) -> Image.Image:
    """A class-specific texture (grating + smooth noise, an object disc for every third class)."""
    style = np.random.default_rng([1234, class_index])
    c0, c1 = style.uniform(0.1, 0.9, 3), style.uniform(0.1, 0.9, 3)
    angle = style.uniform(0, math.pi) + rng.normal(0, 0.03)
    freq = style.uniform(3, 14)
    mix = style.uniform(0.3, 0.8)
    yy, xx = np.mgrid[0:_LOW_RES, 0:_LOW_RES] / _LOW_RES
    grating = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle))
                                 + rng.uniform(0, 2 * math.pi))
    coarse = rng.normal(size=(12, 12))
    noise = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((_LOW_RES, _LOW_RES), Image.Resampling.BICUBIC))
    noise = (noise - noise.min()) / max(1e-6, float(noise.max() - noise.min()))
    field = mix * grating + (1 - mix) * noise
    rgb = c0[None, None, :] * (1 - field[..., None]) + c1[None, None, :] * field[..., None]
    if class_index % 3 == 0:  # an object on the texture
        cy, cx = 0.5 + rng.normal(0, 0.02, 2)
        r = np.hypot(yy - cy, xx - cx)
        disc = np.clip((0.3 - r) * 40, 0, 1)[..., None]
        shade = style.uniform(0.2, 0.9, 3)[None, None, :] * (1.1 - r[..., None])
        rgb = rgb * (1 - disc) + shade * disc
    low = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return low.resize((side, side), Image.Resampling.BICUBIC)


def _add_defect(rng: np.random.Generator, image: Image.Image, kind: str) -> Image.Image:
    """Draw a defect of ``kind`` on ``image`` (in place); return its 0/255 mask."""
    side = image.size[0]
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.2, 0.8, 2) * side
    if kind == "spot":
        r = rng.uniform(0.02, 0.06) * side
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r], fill=255)
    elif kind == "scratch":
        length, angle = rng.uniform(0.15, 0.4) * side, rng.uniform(0, math.pi)
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=max(2, int(0.008 * side)))
    else:
        r = rng.uniform(0.05, 0.1) * side
        points = [(cx + r * rng.uniform(0.5, 1.0) * math.cos(a), cy + r * rng.uniform(0.5, 1.0) * math.sin(a))
                  for a in np.linspace(0, 2 * math.pi, 9)[:-1]]
        draw.polygon(points, fill=255)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    blurred = mask.filter(ImageFilter.GaussianBlur(1.5))
    image.paste(Image.new("RGB", image.size, colour), (0, 0), blurred)
    return mask


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, compress_level=1)
