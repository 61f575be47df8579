"""A seeded generator of captioned pictures: coloured shapes on coloured backgrounds.

Pure NumPy + Pillow. Every sample is fully described by a `Scene`, so evaluation can
compare what a model drew with what the caption asked for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "orange": (245, 135, 20),
    "purple": (135, 45, 185),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# name -> centre as a fraction of the side
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
SIZES = {"small": 0.22, "large": 0.42}  # shape extent as a fraction of the side

POSITION_PHRASES = {
    "center": ["in the center", "in the middle", "centered"],
    "top left": ["in the top left corner", "at the top left", "in the upper left"],
    "top right": ["in the top right corner", "at the top right", "in the upper right"],
    "bottom left": ["in the bottom left corner", "at the bottom left", "in the lower left"],
    "bottom right": ["in the bottom right corner", "at the bottom right", "in the lower right"],
}


@dataclass(frozen=True)
class Scene:
    background: str
    color: str
    shape: str
    position: str
    size: str

    @property
    def combo(self) -> tuple[str, str, str]:
        """The caption combination that decides held-out membership."""
        return (self.color, self.shape, self.background)


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c, s, b in itertools.product(COLORS, SHAPES, COLORS) if c != b]


def held_out_combos(fraction: float = 0.12, seed: int = 1234) -> set[tuple[str, str, str]]:
    """A fixed set of (colour, shape, background) combinations never shown in training.

    Chosen so every colour still appears as shape and as background in training.
    """
    rng = np.random.default_rng(seed)
    combos = all_combos()
    picked = rng.choice(len(combos), size=int(len(combos) * fraction), replace=False)
    return {combos[i] for i in picked}


# Words that say nothing about the scene. Some captions carry one, so the model learns to ignore
# them; the shipped text encoder also maps every token never seen in training to FILLER_TOKEN_WORD.
FILLERS = ("a simple drawing:", "flat illustration,", "digital art,", "an image:", "clip art,")
FILLER_SUFFIXES = (", simple", ", high quality", ", flat colors", ", minimal", ", art")
FILLER_TOKEN_WORD = "art"


def caption(scene: Scene, rng: np.random.Generator, filler_rate: float = 0.0) -> str:
    size = {"small": rng.choice(["small", "little", "tiny"]), "large": rng.choice(["large", "big"])}[scene.size]
    pos = rng.choice(POSITION_PHRASES[scene.position])
    c, s, b = scene.color, scene.shape, scene.background
    templates = [
        f"a {size} {c} {s} {pos} on a {b} background",
        f"a {c} {s} on a {b} background",
        f"{b} background, {size} {c} {s} {pos}",
        f"a {c} {s} {pos}, {b} background",
        f"{size} {c} {s} on {b}",
        f"a picture of a {c} {s} on a {b} background, {pos}",
        f"one {c} {s} {pos} against a {b} background",
        f"{c} {s}, {b} background",
    ]
    text = str(templates[rng.integers(len(templates))])
    if rng.random() < filler_rate:
        text = f"{rng.choice(FILLERS)} {text}" if rng.random() < 0.5 else f"{text}{rng.choice(FILLER_SUFFIXES)}"
    return text


# Attribute classes of the auxiliary scene-parsing loss (train.py): what a caption states.
ATTRIBUTES = {"background": list(COLORS), "color": list(COLORS), "shape": list(SHAPES),
              "position": list(POSITIONS), "size": list(SIZES)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}


def stated_attributes(scene: Scene, text: str) -> list[int]:
    """Class index per ATTRIBUTES entry, or -1 where the caption does not state it."""
    words = text.replace(",", " ").split()
    position_said = any(phrase in text for phrase in POSITION_PHRASES[scene.position])
    size_said = any(w in words for w in SIZE_WORDS[scene.size])
    return [
        ATTRIBUTES["background"].index(scene.background), ATTRIBUTES["color"].index(scene.color),
        ATTRIBUTES["shape"].index(scene.shape),
        ATTRIBUTES["position"].index(scene.position) if position_said else -1,
        ATTRIBUTES["size"].index(scene.size) if size_said else -1,
    ]


def render(scene: Scene, side: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene at `side` x `side` pixels, with a little jitter in place and size."""
    rng = rng or np.random.default_rng(0)
    image = Image.new("RGB", (side, side), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    extent = SIZES[scene.size] * rng.uniform(0.9, 1.1) * side
    x, y = (cx + jitter[0]) * side, (cy + jitter[1]) * side
    half = extent / 2
    box = (x - half, y - half, x + half, y + half)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle, point up
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)
    return image


def sample_scene(rng: np.random.Generator, exclude: set[tuple[str, str, str]] | None = None,
                 only: list[tuple[str, str, str]] | None = None) -> Scene:
    combos = only if only is not None else [c for c in all_combos() if not exclude or c not in exclude]
    color, shape, background = combos[rng.integers(len(combos))]
    return Scene(background, color, shape, str(rng.choice(list(POSITIONS))), str(rng.choice(list(SIZES))))


def batch(rng: np.random.Generator, n: int, side: int, exclude=None) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n training pictures in [-1, 1], (n, 3, side, side) float32, with captions and scenes."""
    scenes = [sample_scene(rng, exclude) for _ in range(n)]
    images = np.stack([np.asarray(render(s, side, rng), dtype=np.float32) for s in scenes])
    images = images.transpose(0, 3, 1, 2) / 127.5 - 1.0
    return images, [caption(s, rng) for s in scenes], scenes
