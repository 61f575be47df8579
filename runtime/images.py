"""Latents <-> pictures, and PNGs that carry their generation parameters."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import EdgesdError
from .schedulers import A1111_OF


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
    sampler = A1111_OF.get(params["scheduler"], params["scheduler"])
    lines.append(
        f"Steps: {params['steps']}, Sampler: {sampler}, CFG scale: {params['guidance_scale']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, Model: {params['model']}"
        + (f", Denoising strength: {params['strength']}" if "strength" in params else "")
    )
    return "\n".join(lines)


def png_bytes(image: Image.Image, params: dict | None = None) -> bytes:
    """A PNG file's bytes; with `params`, their A1111 'parameters' text and our 'edgesd' JSON chunk."""
    info = PngInfo()
    if params is not None:
        info.add_text("parameters", parameters_text(params))
        info.add_text("edgesd", json.dumps(params))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path, params: dict) -> None:
    """Write the picture with its parameters; whole or not at all."""
    write_whole(Path(path), png_bytes(image, params))


PARTIAL = ".partial-"  # `.NAME.partial-PID`: a file being written (a stale one is left by a killed process)


def process_gone(pid: int) -> bool:
    """True when no process `pid` runs (its partial files are stale); another user's counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def remove_stale_partial_files(folder: Path) -> None:
    """Delete the `.NAME.partial-PID` files in `folder` whose writer is gone (killed before it renamed them)."""
    for path in folder.glob(f".*{PARTIAL}*"):
        pid = path.name.rpartition(PARTIAL)[2]
        if path.is_file() and pid.isdigit() and process_gone(int(pid)):
            path.unlink(missing_ok=True)


def write_whole(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a hidden temporary file beside it, then renamed."""
    partial = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise EdgesdError(f"cannot write '{path}' ({e.strerror or e})", "free disk space or choose another output "
                          "path") from None


def check_writable(path: Path) -> None:
    """Before any work: the output can be created in its folder (an existing file is replaced)."""
    path = Path(path)
    if path.is_dir():
        raise EdgesdError(f"output '{path}' is a folder", "name a .png file in it")
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise EdgesdError(f"cannot write to '{path.parent}' ({e.strerror or e})",
                          "choose a folder you can write to") from None


def open_picture(path: Path, max_pixels: int, what: str = "image") -> Image.Image:
    """A picture file -> RGB; its size is checked against `max_pixels` before it is decoded."""
    if not path.is_file():
        raise EdgesdError(f"{what} '{path}' does not exist", "pass the path of a picture file")
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise EdgesdError(f"{what} '{path}' is {image.width}x{image.height}, above the limit of "
                                  f"{max_pixels:,} pixels", "pass a smaller picture, or raise --max-pixels if the "
                                  "machine has the memory")
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise EdgesdError(f"{what} '{path}' decodes to more pixels than Pillow's safety limit",
                          "pass a smaller picture (the file may be a decompression bomb)") from None
    except (Image.UnidentifiedImageError, OSError) as e:
        raise EdgesdError(f"{what} '{path}' cannot be read ({e.__class__.__name__})",
                          "pass a PNG, JPEG or another picture Pillow reads") from None


# A1111's "parameters" keys -> GenerationRequest / Pipeline argument names
_A1111_KEYS = {"Steps": "num_inference_steps", "CFG scale": "guidance_scale", "Seed": "seed",
               "Denoising strength": "strength", "Sampler": "scheduler"}
_A1111_FIELD = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_parameters_text(text: str) -> dict:
    """A1111's 'parameters' text (ours, or A1111's own) -> Pipeline arguments: prompt, negative_prompt,
    num_inference_steps, guidance_scale, seed, width, height, scheduler (A1111's name, with its
    "Schedule type" folded in), strength. Keys edgesd does not use are left out."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and re.match(r"\s*Steps:", lines[-1]) else ""
    negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines))
    out: dict = {"prompt": "\n".join(lines[:negative_at]).strip()}
    if negative_at < len(lines):
        out["negative_prompt"] = "\n".join(lines[negative_at:]).removeprefix("Negative prompt:").strip()
    fields = {m[1].strip(): m[2].strip().strip('"') for m in _A1111_FIELD.finditer(settings) if m[1].strip()}
    for key, name in _A1111_KEYS.items():
        if key in fields:
            out[name] = fields[key]
    if "Size" in fields and re.fullmatch(r"\d+x\d+", fields["Size"]):
        out["width"], out["height"] = (int(v) for v in fields["Size"].split("x"))
    schedule = fields.get("Schedule type", "Automatic")
    if "scheduler" in out and schedule not in ("Automatic", "") and schedule not in out["scheduler"]:
        out["scheduler"] = f"{out['scheduler']} {schedule}"  # A1111 1.9+: "DPM++ 2M" + "Karras"
    for name, kind in (("num_inference_steps", int), ("seed", int), ("guidance_scale", float), ("strength", float)):
        if name in out:
            try:
                out[name] = kind(out[name])
            except ValueError:
                raise EdgesdError(f"the picture's parameters have {name} {out[name]!r}, not a number",
                                  "pass that option on the command line") from None
    return out


# Our own 'edgesd' chunk (JSON, as GenerationRequest.parameters wrote it) -> Pipeline arguments.
_OURS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "num_inference_steps",
         "scheduler": "scheduler", "guidance_scale": "guidance_scale", "guidance_rescale": "guidance_rescale",
         "guidance_cutoff": "guidance_cutoff", "deepcache_interval": "deepcache_interval",
         "token_merging": "token_merging", "seed": "seed",
         "width": "width", "height": "height", "noise_generator": "noise_generator",
         "prompt_2": "prompt_2", "negative_prompt_2": "negative_prompt_2", "strength": "strength",
         "vae_tiling": "vae_tiling", "vae_tile_size": "vae_tile_size"}


def read_parameters(path: Path) -> dict:
    """The generation parameters a PNG carries: our 'edgesd' JSON chunk, else the A1111 'parameters' text."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, Image.UnidentifiedImageError) as e:
        raise EdgesdError(f"cannot read '{path}' ({e.__class__.__name__})", "pass a PNG that edgesd or A1111 wrote") from None
    if "edgesd" in text:
        try:
            ours = json.loads(text["edgesd"])
        except ValueError:
            ours = None
        if isinstance(ours, dict):
            return {arg: ours[key] for key, arg in _OURS.items() if key in ours and ours[key] not in ("", None)}
    if "parameters" in text:
        return parse_parameters_text(text["parameters"])
    raise EdgesdError(f"'{path}' carries no generation parameters (no 'parameters' or 'edgesd' text chunk)",
                      "pass a PNG written by edgesd or A1111, or give the prompt and options yourself")
