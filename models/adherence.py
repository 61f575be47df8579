"""Read back what a generated shapes picture shows, by plain pixel analysis.

Used by the evaluation in bench/ and by the default-model tests: background colour,
shape colour, shape kind and position, recovered without any learned model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .training import shapes
from .training.shapes import COLORS, POSITIONS

# Score of random guessing, per attribute.
CHANCE = {"background": 1 / len(COLORS), "color": 1 / (len(COLORS) - 1), "shape": 1 / len(shapes.SHAPES),
          "position": 1 / len(POSITIONS)}


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


def prompts_for(combos) -> list[tuple[str, "shapes.Scene"]]:
    """One prompt per (colour, shape, background) combination and position, with the scene it asks for."""
    out = []
    for color, shape, background in sorted(combos):
        for position in POSITIONS:
            scene = shapes.Scene(background, color, shape, position, "large")
            pos = shapes.POSITION_PHRASES[position][0]
            out.append((f"a large {color} {shape} {pos} on a {background} background", scene))
    return out


def held_out_prompts() -> list[tuple[str, "shapes.Scene"]]:
    """The evaluation prompts: every held-out combination at every position (100 prompts)."""
    return prompts_for(shapes.held_out_combos())


def score(images, scenes) -> dict[str, float]:
    """Percent of pictures whose background, shape colour, shape and position read back right."""
    hits = {k: 0 for k in CHANCE}
    for image, scene in zip(images, scenes):
        r = read_picture(image)
        hits["background"] += r.background == scene.background
        hits["color"] += r.color == scene.color
        hits["shape"] += r.shape == scene.shape
        hits["position"] += r.position == scene.position
    return {k: round(100 * v / len(scenes), 1) for k, v in hits.items()}
