"""Defects drawn onto demo scenes, each returning the altered image and its exact mask.

Every defect builds an opacity ``alpha`` ``(S, S)`` that is exactly zero outside the altered
region, blends the defect in with it, and reports ``alpha > 0`` as the mask. Sizes are
fractions of the image side, so small test images get proportionally small defects.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt, gaussian_filter

from moleflow.data.demo_render import Scene, smooth_noise

SUPERSAMPLE = 4   # strokes are drawn at 4x and averaged down: anti-aliased edges
CUTOFF = 0.12     # opacity below this is dropped, so the mask is exactly the visible change

Defect = Callable[[Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- shapes (alpha fields)

def stroke_alpha(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Coverage ``(S, S)`` of a polyline ``(N, 2)`` (x, y in pixels) drawn ``width`` px wide."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    scaled = [(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for x, y in points]
    ImageDraw.Draw(big).line(scaled, fill=255, width=max(1, round(width * SUPERSAMPLE)), joint="curve")
    cover = np.asarray(big, dtype=np.float64).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
    return cover.mean(axis=(1, 3)) / 255.0


def curve_points(rng: np.random.Generator, middle: np.ndarray, length: float,
                 heading: Optional[float] = None) -> np.ndarray:
    """A gently bent quadratic Bezier curve ``(64, 2)`` of about ``length`` px around ``middle``;
    ``heading``: the direction (radians) from start to end, random when None."""
    heading = rng.uniform(0.0, 2 * np.pi) if heading is None else heading
    half = length / 2 * np.array([np.cos(heading), np.sin(heading)])
    start, end = middle - half, middle + half
    bend = rng.uniform(-0.3, 0.3) * length * np.array([-np.sin(heading), np.cos(heading)])
    control = (start + end) / 2 + bend
    t = np.linspace(0.0, 1.0, 64)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


def jagged_points(rng: np.random.Generator, start: np.ndarray, length: float) -> np.ndarray:
    """A crack-like random walk ``(N, 2)`` with persistent direction and sharp small turns."""
    steps = 24
    heading = rng.uniform(0.0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0.0, 0.35, steps))
    step = length / steps
    moves = step * np.stack([np.cos(heading + turns), np.sin(heading + turns)], axis=1)
    return start + np.vstack([np.zeros((1, 2)), np.cumsum(moves, axis=0)])


def blob_field(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """An irregular bump ``(S, S)``, 1 at its peak: a few Gaussians plus low-frequency noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    field = np.zeros((size, size))
    for _ in range(4):
        c = centre + rng.normal(0.0, radius * 0.35, 2)
        r = radius * rng.uniform(0.5, 0.9)
        field += np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * r ** 2))
    field *= 1.0 + 0.25 * smooth_noise(rng, size, max(1.0, radius / 4))
    return field / field.max()


def irregular_region(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float,
                     aspect: float = 1.0) -> np.ndarray:
    """Boolean ``(S, S)`` star-shaped region whose radius wobbles with the angle (holes, chips)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    tilt = rng.uniform(0.0, np.pi)
    dx, dy = xx - centre[0], yy - centre[1]
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) * aspect
    theta = np.arctan2(v, u)
    wobble = sum(rng.normal(0.0, 0.12 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                 for k in range(2, 7))
    return np.hypot(u, v) < radius * (1.0 + wobble)


# ---------------------------------------------------------------- placement and blending

def texture_centre(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect centre ``(x, y)`` away from the image border."""
    return rng.uniform(0.25 * size, 0.75 * size, 2)


def object_centre(rng: np.random.Generator, scene: Scene, margin: float) -> np.ndarray:
    """A defect centre ``(x, y)`` on the object, at least ``margin`` px inside its outline."""
    inside = distance_transform_edt(scene.coverage > 0.99) > margin
    ys, xs = np.nonzero(inside)
    pick = rng.integers(len(xs))
    return np.array([xs[pick] + 0.5, ys[pick] + 0.5])


def blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``colour`` (``(3,)`` or ``(S, S, 3)``) over ``image`` with ``alpha`` cut at CUTOFF."""
    alpha = np.where(alpha >= CUTOFF, alpha, 0.0)
    out = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(out, 0.0, 1.0), alpha > 0


# ---------------------------------------------------------------- defects

def object_rings(scene: Scene) -> tuple[np.ndarray, float, float]:
    """Centre ``(x, y)``, inner (hole) radius and outer (side) radius of a ring-shaped object."""
    ys, xs = np.nonzero(scene.coverage > 0.5)
    centre = np.array([xs.mean(), ys.mean()]) + 0.5
    size = scene.coverage.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dist = np.hypot(xx - centre[0], yy - centre[1])
    inner = dist[scene.coverage > 0.5].min()
    outer = dist[(scene.coverage < 0.5) & (dist > inner + 1.0)].min()
    return centre, float(inner), float(outer)


def scratch(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright curved scratch with a dark groove edge, running round the object's face."""
    size = scene.image.shape[0]
    centre, inner, outer = object_rings(scene)
    angle = rng.uniform(0.0, 2 * np.pi)
    ring_radius = inner + rng.uniform(0.35, 0.65) * (outer - inner)
    middle = centre + ring_radius * np.array([np.cos(angle), np.sin(angle)])
    heading = angle + np.pi / 2 + rng.normal(0.0, 0.25)
    points = curve_points(rng, middle, size * rng.uniform(0.2, 0.3), heading)
    groove = stroke_alpha(size, points + size * 0.006, size * 0.016) * scene.coverage
    image, groove_mask = blend(scene.image, np.array([0.18, 0.18, 0.2]), 0.8 * groove)
    line = stroke_alpha(size, points, size * 0.011) * scene.coverage
    image, line_mask = blend(image, np.array([1.0, 1.0, 0.98]), line)
    return image, groove_mask | line_mask


def missing_chunk(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bite taken out of the object's rim, showing the table, with a bright broken edge."""
    size = scene.image.shape[0]
    centre, _, radius = object_rings(scene)
    heading = rng.uniform(0.0, 2 * np.pi)
    bite_centre = centre + radius * 1.1 * np.array([np.cos(heading), np.sin(heading)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dist = np.hypot(xx - bite_centre[0], yy - bite_centre[1])
    bite_radius = radius * rng.uniform(0.4, 0.5)
    cut = np.clip(bite_radius - dist + 0.5, 0.0, 1.0) * scene.coverage
    image, cut_mask = blend(scene.image, scene.background, cut)
    edge = np.clip(1.0 - np.abs(dist - bite_radius - size * 0.008) / (size * 0.008), 0.0, 1.0)
    image, edge_mask = blend(image, np.array([0.98, 0.97, 0.92]), 0.7 * edge * scene.coverage)
    return image, cut_mask | edge_mask


def rust(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rough orange-brown rust patch on the object."""
    size = scene.image.shape[0]
    radius = size * rng.uniform(0.045, 0.07)
    field = blob_field(rng, size, object_centre(rng, scene, radius * 0.5), radius)
    colour = np.array([0.55, 0.27, 0.09]) * (1.0 + 0.25 * smooth_noise(rng, size, 0.8))[..., None]
    alpha = np.where(field > 0.35, 0.55 + 0.4 * np.clip((field - 0.35) / 0.3, 0, 1), 0.0)
    return blend(scene.image, colour, alpha * (scene.coverage > 0.99))


def stain(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dried liquid stain: tinted darkening with a darker tide-line at its border."""
    size = scene.image.shape[0]
    field = blob_field(rng, size, texture_centre(rng, size), size * rng.uniform(0.08, 0.12))
    tint = np.array([0.55, 0.38, 0.18]) + rng.normal(0.0, 0.04, 3)
    strength = rng.uniform(0.55, 0.7)
    inside = np.clip((field - 0.35) / 0.3, 0.0, 1.0)
    tide = np.exp(-((field - 0.37) / 0.05) ** 2)
    alpha = np.where(field > 0.35, strength * (0.55 + 0.45 * inside) + 0.3 * tide, 0.0).clip(0, 1)
    return blend(scene.image, scene.image * tint, alpha)


def hole(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A torn hole: dark backing seen through an irregular ellipse, frayed lighter rim."""
    size = scene.image.shape[0]
    centre = texture_centre(rng, size)
    radius = size * rng.uniform(0.05, 0.075)
    inner = irregular_region(rng, size, centre, radius, aspect=rng.uniform(1.0, 1.6))
    depth = distance_transform_edt(inner)
    dark = (0.03 + 0.08 * np.exp(-depth / (size * 0.02)))[..., None] * np.ones(3)
    rim = (distance_transform_edt(~inner) <= size * 0.016) & ~inner
    frayed = scene.image * 1.35 + 0.1
    image, rim_mask = blend(scene.image, frayed, np.where(rim, 0.8, 0.0))
    image, hole_mask = blend(image, dark, inner.astype(np.float64))
    return image, rim_mask | hole_mask


def thread(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stray coloured thread lying on the fabric, with its soft shadow."""
    size = scene.image.shape[0]
    points = curve_points(rng, texture_centre(rng, size), size * rng.uniform(0.3, 0.45))
    shadow = gaussian_filter(stroke_alpha(size, points + size * 0.008, size * 0.02), 0.6)
    image, shadow_mask = blend(scene.image, scene.image * 0.35, 0.8 * shadow)
    colours = (np.array([0.95, 0.82, 0.35]), np.array([0.8, 0.12, 0.1]))
    colour = colours[int(rng.integers(2))] * (1.0 + 0.1 * smooth_noise(rng, size, 0.7))[..., None]
    image, line_mask = blend(image, colour, stroke_alpha(size, points, size * 0.016))
    return image, shadow_mask | line_mask


def crack(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A jagged dark hairline crack with a short branch."""
    size = scene.image.shape[0]
    main = jagged_points(rng, texture_centre(rng, size), size * rng.uniform(0.3, 0.45))
    branch = jagged_points(rng, main[len(main) // 2], size * rng.uniform(0.1, 0.18))
    alpha = np.maximum(stroke_alpha(size, main, size * 0.013), stroke_alpha(size, branch, size * 0.009))
    return blend(scene.image, np.array([0.16, 0.13, 0.11]), alpha)


def chip(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A chipped-off piece of glaze showing the rough, darker clay body beneath."""
    size = scene.image.shape[0]
    region = irregular_region(rng, size, texture_centre(rng, size), size * rng.uniform(0.05, 0.08),
                              aspect=rng.uniform(1.0, 1.5))
    depth = distance_transform_edt(region)
    clay = np.array([0.66, 0.44, 0.30]) * (1.0 + 0.18 * smooth_noise(rng, size, 0.9))[..., None]
    clay = clay * (0.7 + 0.3 * (1.0 - np.exp(-depth / (size * 0.015))))[..., None]
    rim = (distance_transform_edt(~region) <= size * 0.008) & ~region  # broken glaze edge
    image, rim_mask = blend(scene.image, np.array([0.97, 0.95, 0.9]), np.where(rim, 0.6, 0.0))
    image, chip_mask = blend(image, clay, region.astype(np.float64))
    return image, rim_mask | chip_mask


DEFECTS: dict[str, dict[str, Defect]] = {
    "fabric": {"hole": hole, "stain": stain, "thread": thread},
    "tile": {"crack": crack, "chip": chip, "stain": stain},
    "nut": {"scratch": scratch, "missing": missing_chunk, "rust": rust},
}
