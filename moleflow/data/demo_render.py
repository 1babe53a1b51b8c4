"""Defect-free images of the three demo classes, drawn with numpy/scipy only.

Every renderer takes a seeded ``numpy.random.Generator`` and the image side ``size`` and
returns a :class:`Scene`: the float RGB image ``(S, S, 3)`` in [0, 1] and, for the object
class, the layers a defect needs (object coverage, background). Lengths are fractions of
``size`` so a small test size draws the same pictures, only smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass
class Scene:
    """A rendered image and the layers defects are drawn against (coverage, background: None for textures)."""

    image: np.ndarray                          # RGB (S, S, 3) float in [0, 1]
    coverage: Optional[np.ndarray] = None      # object coverage (S, S) in [0, 1]
    background: Optional[np.ndarray] = None    # what lies behind the object, RGB (S, S, 3)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise ``(S, S)`` with zero mean and unit standard deviation."""
    field = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def lighting(rng: np.random.Generator, size: int, strength: float = 0.06) -> np.ndarray:
    """A gentle random linear illumination gradient ``(S, S)`` around 1."""
    yy, xx = _grid(size)
    gx, gy = rng.uniform(-strength, strength, 2)
    return 1.0 + gx * (xx / size - 0.5) + gy * (yy / size - 0.5)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(S, S)`` each: rows (y) and columns (x)."""
    axis = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(axis, axis, indexing="ij")


def _rotated(size: int, angle: float, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) rotated by ``angle`` radians about the centre and shifted."""
    yy, xx = _grid(size)
    xx, yy = xx - size / 2, yy - size / 2
    cos, sin = np.cos(angle), np.sin(angle)
    return xx * cos + yy * sin + shift[0], -xx * sin + yy * cos + shift[1]


def render_fabric(rng: np.random.Generator, size: int) -> Scene:
    """2/1 twill, denim-like: blue warp over two light weft threads, under one; fibre noise."""
    period = size / 18.0 * rng.uniform(0.97, 1.03)
    tilt = np.deg2rad(np.clip(rng.normal(0.0, 1.5), -3.0, 3.0))
    u, v = _rotated(size, tilt, tuple(rng.uniform(0, 3 * period, 2)))
    cu, cv = np.floor(u / period), np.floor(v / period)
    fu, fv = u / period - cu, v / period - cv
    warp_on_top = (cu + cv) % 3 != 0  # shifts by one each row: diagonal ribs
    # A thread is bright along its centre line and dips where it passes under the crossing thread.
    warp = np.sin(np.pi * fu) ** 0.6 * (0.75 + 0.25 * np.sin(np.pi * fv))
    weft = np.sin(np.pi * fv) ** 0.6 * (0.75 + 0.25 * np.sin(np.pi * fu))
    fibre = 0.07 * smooth_noise(rng, size, 0.7) + 0.04 * smooth_noise(rng, size, size / 10)
    warp_colour = np.array([0.20, 0.30, 0.55]) + rng.normal(0.0, 0.015, 3)
    weft_colour = np.array([0.62, 0.66, 0.74]) + rng.normal(0.0, 0.015, 3)
    shade = np.where(warp_on_top, warp, weft)[..., None]
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    image = colour * (0.35 + 0.75 * shade) * (1.0 + fibre[..., None]) * lighting(rng, size)[..., None]
    return Scene(np.clip(image, 0.0, 1.0))


def render_tile(rng: np.random.Generator, size: int) -> Scene:
    """Glazed ceramic tiles on a grey grout grid, each tile slightly different in tone."""
    pitch = size / 3.5 * rng.uniform(0.98, 1.02)
    grout = size / 48.0
    u, v = _rotated(size, np.deg2rad(rng.normal(0.0, 0.8)), tuple(rng.uniform(0, pitch, 2)))
    cu, cv = np.floor(u / pitch), np.floor(v / pitch)
    # Distance from each pixel to the nearest grout line centre, in pixels.
    du = np.abs(u - (cu + 0.5) * pitch)
    dv = np.abs(v - (cv + 0.5) * pitch)
    edge = pitch / 2 - np.maximum(du, dv)
    tile_cover = np.clip(edge - grout / 2 + 0.5, 0.0, 1.0)
    bevel = 1.0 - 0.18 * np.exp(-np.maximum(edge - grout / 2, 0.0) / (size / 90.0))
    tone_ids = (cu.astype(np.int64) * 7919 + cv.astype(np.int64) * 104729) % 97
    tone = 1.0 + 0.04 * rng.standard_normal(97)[tone_ids]
    mottle = 0.03 * smooth_noise(rng, size, size / 30) + 0.035 * smooth_noise(rng, size, 0.8)
    tile_colour = np.array([0.86, 0.78, 0.64]) + rng.normal(0.0, 0.012, 3)
    grout_colour = np.array([0.50, 0.50, 0.48]) * (1.0 + 0.08 * smooth_noise(rng, size, 1.0))[..., None]
    tiles = tile_colour * (tone * bevel * (1.0 + mottle))[..., None]
    image = tile_cover[..., None] * tiles + (1.0 - tile_cover[..., None]) * grout_colour
    return Scene(np.clip(image * lighting(rng, size)[..., None], 0.0, 1.0))


def render_nut(rng: np.random.Generator, size: int) -> Scene:
    """A steel hex nut seen from above on a dark table, with its threaded hole and soft shadow."""
    yy, xx = _grid(size)
    centre = size / 2 + rng.normal(0.0, size * 0.012, 2)
    radius = size * 0.33 * rng.uniform(0.98, 1.02)
    angle = rng.uniform(0.0, np.pi / 3)
    dx, dy = xx - centre[0], yy - centre[1]
    dist = np.hypot(dx, dy)
    hexagon = np.full((size, size), np.inf)
    for k in range(6):  # signed distance to the six sides (negative inside)
        normal = angle + np.pi / 6 + k * np.pi / 3
        along = dx * np.cos(normal) + dy * np.sin(normal)
        hexagon = np.minimum(hexagon, radius * np.cos(np.pi / 6) - along)
    outside = np.minimum(hexagon, radius * 0.97 - dist)  # corners rounded by the chamfer
    hole_radius = radius * 0.42
    coverage = np.clip(outside + 0.5, 0.0, 1.0) * np.clip(dist - hole_radius + 0.5, 0.0, 1.0)

    table = np.array([0.17, 0.19, 0.22]) + rng.normal(0.0, 0.01, 3)
    background = table * (1.0 + 0.03 * smooth_noise(rng, size, 2.0))[..., None]
    shadow_offset = size * 0.02
    shadow = gaussian_filter(np.roll(coverage, (int(shadow_offset), int(shadow_offset)), axis=(0, 1)),
                             size * 0.02)
    background = background * (1.0 - 0.45 * shadow)[..., None]
    hole = 0.06 + 0.05 * (0.5 + 0.5 * np.sin(dist / (size * 0.012)))  # thread rings seen inside
    background = np.where((dist < hole_radius)[..., None], hole[..., None] * np.ones(3), background)

    light = 0.62 + 0.18 * (-(dx + dy) / (radius * 2.0))  # lit from the top left
    chamfer = np.clip((dist - radius * 0.80) / (radius * 0.10), 0.0, 1.0)
    ring = np.clip(1.0 - (dist - hole_radius) / (radius * 0.08), 0.0, 1.0)  # bevel at the hole
    brushed = 0.04 * smooth_noise(rng, size, 0.8)
    steel = np.array([0.92, 0.93, 0.95]) + rng.normal(0.0, 0.01, 3)
    metal = (light + 0.12 * chamfer * np.cos(np.arctan2(dy, dx) + np.pi / 4) - 0.15 * ring + brushed)
    metal = steel * (metal * rng.uniform(0.95, 1.05))[..., None]
    light_field = lighting(rng, size, 0.04)[..., None]
    image = (coverage[..., None] * metal + (1.0 - coverage[..., None]) * background) * light_field
    return Scene(np.clip(image, 0.0, 1.0), coverage, np.clip(background * light_field, 0.0, 1.0))


RENDERERS = {"fabric": render_fabric, "tile": render_tile, "nut": render_nut}
