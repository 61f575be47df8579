"""Load a local diffusers-layout Stable Diffusion folder, refusing anything incomplete.

A weight that is missing, unexpected or of the wrong shape is an error naming it:
libraries may otherwise fill a layer with random values and only log it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from edgesd.errors import EdgesdError
from edgesd.model import read_json

COMPONENT_DIRS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Buffers older transformers saved that current CLIP recomputes; harmless if present.
_IGNORABLE_TEXT_KEYS = ("embeddings.position_ids",)


@dataclass
class SourceModel:
    root: Path
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    configs: dict[str, dict]  # unet, vae, text_encoder, scheduler, model_index


def check_source_folder(src: Path) -> None:
    if not src.exists():
        raise EdgesdError(f"source folder '{src}' does not exist", "pass a local diffusers-layout SD folder")
    if not src.is_dir():
        raise EdgesdError(f"'{src}' is not a folder", "pass the diffusers folder (the one with model_index.json)")
    if not (src / "model_index.json").is_file():
        raise EdgesdError(f"'{src}' has no model_index.json", "pass a diffusers-layout Stable Diffusion folder")
    for name in COMPONENT_DIRS:
        if not (src / name).is_dir():
            raise EdgesdError(f"'{src}' has no {name}/ folder", "a diffusers SD folder needs " + ", ".join(COMPONENT_DIRS))
    for name in ("unet", "vae", "text_encoder"):
        if not (src / name / "config.json").is_file():
            raise EdgesdError(f"'{src / name}' has no config.json", "copy the component's config.json into it")
        if not _weight_files(src / name):
            raise EdgesdError(f"'{src / name}' holds no weights (*.safetensors or *.bin)", "copy the weights into it")


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files  # prefer safetensors, as diffusers does


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of one component; plain files win over variants such as `*.fp16.safetensors`."""
    from safetensors.torch import load_file

    files = _weight_files(folder)
    plain = [p for p in files if "." not in p.name[: -len(p.suffix)]]
    files = plain or [p for p in files if p.name.split(".")[-2] == files[0].name.split(".")[-2]]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EdgesdError(f"cannot read weights {path} ({str(e)[:120]})", "the file is corrupt or truncated") from None
        state.update(part)
    return state


def _check_keys(component: str, model: torch.nn.Module, state: dict[str, torch.Tensor], ignorable=()) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(ignorable)]
    unexpected = [k for k in state if k not in expected and not k.endswith(ignorable)]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    for label, items, fix in (("missing", missing, "the checkpoint is incomplete"),
                              ("unexpected", unexpected, "the config does not match the weights"),
                              ("of the wrong shape", wrong, "the config does not match the weights")):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            raise EdgesdError(f"{component}: weights {label}: {', '.join(items[:3])}{more}", fix)


def _text_key_map(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Match transformers 4.x (`text_model.` prefix) and 5.x checkpoints to the installed model's keys."""
    prefix = "text_model."
    model_prefixed = any(k.startswith(prefix) for k in expected)
    out = {}
    for key, value in state.items():
        if model_prefixed and not key.startswith(prefix):
            key = prefix + key
        elif not model_prefixed and key.startswith(prefix):
            key = key[len(prefix):]
        out[key] = value
    return out


def load_text_encoder(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(folder)
    model = CLIPTextModel(config).eval()
    state = _text_key_map(_read_state_dict(folder), set(model.state_dict()))
    _check_keys("text_encoder", model, state, _IGNORABLE_TEXT_KEYS)
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(_IGNORABLE_TEXT_KEYS)}, strict=False)
    return model


def load_diffusers_component(cls, folder: Path, component: str) -> torch.nn.Module:
    config = cls.load_config(folder)
    with torch.device("meta"):  # no time or memory spent on random initial weights
        model = cls.from_config(config).eval()
    state = _read_state_dict(folder)
    _check_keys(component, model, state)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a buffer not in the checkpoint
        model = cls.from_config(config).eval()
        model.load_state_dict(state, strict=True)
    return model


def load_source(src: Path) -> SourceModel:
    """Load the three networks of a diffusers SD folder in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_source_folder(src)
    configs = {
        "model_index": read_json(src / "model_index.json", "source model"),
        "unet": read_json(src / "unet" / "config.json", "U-Net"),
        "vae": read_json(src / "vae" / "config.json", "VAE"),
        "text_encoder": read_json(src / "text_encoder" / "config.json", "text encoder"),
        "scheduler": read_json(src / "scheduler" / "scheduler_config.json", "scheduler"),
    }
    if configs["unet"].get("addition_embed_type") or configs["unet"].get("class_embed_type"):
        raise EdgesdError(f"{src}: this U-Net takes extra conditioning (SDXL/upscaler)",
                          "only SD 1.x/2.x text-to-image models are supported")
    with torch.no_grad():
        text_encoder = load_text_encoder(src / "text_encoder").float()
        unet = load_diffusers_component(UNet2DConditionModel, src / "unet", "unet").float()
        vae = load_diffusers_component(AutoencoderKL, src / "vae", "vae").float()
    return SourceModel(src, text_encoder, unet, vae, configs)


def source_checksum(src: Path) -> str:
    """sha256 over every config and weight file of the source, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(src)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
