"""Latents <-> pictures, and PNGs that carry their generation parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import EdgesdError
from .schedulers import A1111_NAMES


def to_pil(decoded: np.ndarray) -> list[Image.Image]:
    """VAE output in [-1, 1], (N, 3, H, W) -> PIL RGB images."""
    pixels = np.clip(decoded / 2 + 0.5, 0.0, 1.0)
    pixels = (pixels.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)  # (N, H, W, 3)
    return [Image.fromarray(p) for p in pixels]


def from_pil(image, width: int, height: int) -> np.ndarray:
    """A PIL image or (H, W, 3) uint8 array -> (1, 3, height, width) float32 in [-1, 1], resized if needed."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise EdgesdError(f"image array has shape {image.shape} and dtype {image.dtype}",
                              "pass an (H, W, 3) uint8 array or a PIL image")
        image = Image.fromarray(image[..., :3])
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return pixels.transpose(2, 0, 1)[None].copy()


def mask_from_picture(mask, width: int, height: int) -> np.ndarray:
    """An inpainting mask (white = repaint) -> (1, 1, height, width) float32 of 0 and 1, as diffusers' mask
    processor makes it: grey levels, resized (Lanczos), then cut at 0.5."""
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(mask[..., 0] if mask.ndim == 3 else mask)
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    grey = np.asarray(mask, dtype=np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)[None, None]


def parameters_text(params: dict) -> str:
    """The A1111-style 'parameters' text many image tools read back."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    sampler = {ours: theirs for theirs, ours in A1111_NAMES.items()}.get(params["scheduler"], params["scheduler"])
    lines.append(
        f"Steps: {params['steps']}, Sampler: {sampler}, CFG scale: {params['guidance_scale']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, Model: {params['model']}"
        + (f", Denoising strength: {params['strength']}" if "strength" in params else "")
    )
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, params: dict) -> None:
    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("edgesd", json.dumps(params))
    image.save(path, format="PNG", pnginfo=info)
