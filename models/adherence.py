"""Read back what a generated shapes picture shows, by plain pixel analysis.

Used by the evaluation in bench/ and by the default-model tests: background colour,
shape colour, shape kind and position, recovered without any learned model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .training.shapes import COLORS, POSITIONS


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None  # None when no shape stands out from the background
    shape: str | None
    position: str | None


def _nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def read_picture(image) -> Reading:
    """Analyse an RGB picture (PIL image or (H, W, 3) uint8 array)."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_color(bg_rgb)
    distance = np.sqrt(((pixels - bg_rgb) ** 2).sum(axis=2))
    mask = distance > 80.0  # pixels clearly unlike the background
    if mask.sum() < 0.01 * h * w:
        return Reading(background, None, None, None)
    color = _nearest_color(np.median(pixels[mask], axis=0))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box_area  # square ~1.0, circle ~0.79, triangle ~0.5
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
    return Reading(background, color, shape, position)
