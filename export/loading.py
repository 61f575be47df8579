"""Load a local diffusers-layout Stable Diffusion folder, refusing anything incomplete.

A weight that is missing, unexpected or of the wrong shape is an error naming it:
libraries may otherwise fill a layer with random values and only log it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Protocol
from pathlib import Path

import torch

from edgesd.errors import EdgesdError
from edgesd.families import ModelFamily, detect_family
from edgesd.model import read_json
from edgesd.tokenizer import ClipTokenizer

WEIGHT_SUFFIXES = (".safetensors", ".bin")
STANDARD_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
# Buffers older transformers saved that current CLIP recomputes; harmless if present.
_IGNORABLE_TEXT_KEYS = ("embeddings.position_ids",)
# Source folder of each exported component.
SOURCE_FOLDER = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
                 "vae_decoder": "vae", "vae_encoder": "vae"}


class WeightSource(Protocol):
    """Where a model's weights are read: a diffusers folder, or one single-file checkpoint."""

    def state(self, folder: str, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The weights of the component in `folder` (unet, vae, text_encoder, text_encoder_2), named as the
        diffusers / transformers module expects (`expected`: its state-dict keys and shapes)."""
        ...


@dataclass(frozen=True)
class FolderWeights:
    root: Path

    def state(self, folder: str, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        state = _read_state_dict(self.root / folder)
        return _text_key_map(state, set(expected)) if folder.startswith("text_encoder") else state


@dataclass
class SourceModel:
    """A model's family, configs and tokenizers; each network is loaded when asked for (one at a time)."""

    root: Path  # the diffusers folder or the single file
    family: ModelFamily
    configs: dict[str, dict]  # unet, vae, text_encoder(_2), scheduler, model_index
    tokenizers: dict[str, ClipTokenizer]
    weights: WeightSource
    vae: WeightSource | None = None  # --vae: another VAE than the model's own
    notes: tuple[str, ...] = ()  # what the loader assumed (shown to the user)
    transforms: tuple[Callable[[str, torch.nn.Module], None], ...] = ()  # e.g. LoRA merges, per component

    def load(self, component: str) -> torch.nn.Module:
        """The fp32 PyTorch module of `component` (the VAE for vae_decoder / vae_encoder)."""
        folder = SOURCE_FOLDER[component]
        weights = self.vae if folder == "vae" and self.vae is not None else self.weights
        with torch.no_grad():
            model = build_module(folder, self.configs[folder], weights, self.family.projected(folder))
            for transform in self.transforms:
                transform(folder, model)
        return model


def build_module(folder: str, config: dict, weights: WeightSource, projected: bool = False) -> torch.nn.Module:
    """The fp32 module of a component from its diffusers / transformers config and `weights`; a weight missing,
    unexpected or of the wrong shape is an error naming it."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if folder.startswith("text_encoder"):
        cls = CLIPTextModelWithProjection if projected else CLIPTextModel
        model = cls(CLIPTextConfig.from_dict(config)).eval()
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = weights.state(folder, expected)
        _check_keys(folder, model, state, _IGNORABLE_TEXT_KEYS)
        model.load_state_dict({k: v.float() for k, v in state.items() if not k.endswith(_IGNORABLE_TEXT_KEYS)},
                              strict=False)
        return model.float()
    cls = UNet2DConditionModel if folder == "unet" else AutoencoderKL
    if folder == "vae" and config.get("_class_name") == "AutoencoderTiny":  # TAESD
        cls = AutoencoderTiny
    with torch.device("meta"):  # no time or memory spent on random initial weights
        model = cls.from_config(config).eval()
    state = weights.state(folder, {k: v.shape for k, v in model.state_dict().items()})
    _check_keys(folder, model, state)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a buffer not in the checkpoint
        model = cls.from_config(config).eval()
        model.load_state_dict(state, strict=True)
    return model.float()


def source_dirs(family: ModelFamily) -> tuple[str, ...]:
    return ("unet", *family.text_components, *(e.tokenizer for e in family.text_encoders), "vae", "scheduler")


def check_source_folder(src: Path) -> ModelFamily:
    """Check `src` is a complete diffusers folder of a family edgesd runs; returns the family."""
    if not src.exists():
        raise EdgesdError(f"source folder '{src}' does not exist", "pass a local diffusers-layout SD folder")
    if not src.is_dir():
        raise EdgesdError(f"'{src}' is not a folder", "pass the diffusers folder (the one with model_index.json)")
    if not (src / "model_index.json").is_file():
        raise EdgesdError(f"'{src}' has no model_index.json", "pass a diffusers-layout Stable Diffusion folder")
    index = read_json(src / "model_index.json", "source model")
    unet_config = read_json(src / "unet" / "config.json", "U-Net") if (src / "unet" / "config.json").is_file() else {}
    family = detect_family(index, unet_config, str(src))
    dirs = source_dirs(family)
    for name in dirs:
        if not (src / name).is_dir():
            raise EdgesdError(f"'{src}' has no {name}/ folder", f"a diffusers {family.title} folder needs "
                              + ", ".join(dirs))
    for name in ("unet", "vae", *family.text_components):
        if not (src / name / "config.json").is_file():
            raise EdgesdError(f"'{src / name}' has no config.json", "copy the component's config.json into it")
        if not _weight_files(src / name):
            raise EdgesdError(f"'{src / name}' holds no weights (*.safetensors or *.bin)", "copy the weights into it")
    return family


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files  # prefer safetensors, as diffusers does


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of one component; plain files win over variants such as `*.fp16.safetensors`."""
    from safetensors.torch import load_file

    files = _weight_files(folder)
    # diffusers / transformers read only their own names (sharded: NAME-00001-of-00002); a folder may hold
    # other files beside them (madebyollin/taesd keeps taesd_decoder.safetensors in the original layout)
    standard = [p for p in files if p.name.split(".")[0].split("-0")[0] in STANDARD_WEIGHT_NAMES]
    files = standard or files
    plain = [p for p in files if "." not in p.name[: -len(p.suffix)]]
    files = plain or [p for p in files if p.name.split(".")[-2] == files[0].name.split(".")[-2]]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if path.suffix == ".bin" and "weights_only" in str(e):  # a pickle holding more than tensors
                raise EdgesdError(f"{path} is a pickle that holds more than tensors, which edgesd does not load "
                                  "(torch.load weights_only refused it)", "convert the component to .safetensors "
                                  "where you trust the file, or get its .safetensors version") from None
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
        if key.startswith("text_projection."):  # CLIPTextModelWithProjection's own layer, never prefixed
            out[key] = value
        elif model_prefixed and not key.startswith(prefix):
            key = prefix + key
        elif not model_prefixed and key.startswith(prefix):
            key = key[len(prefix):]
        out[key] = value
    return out


def folder_tokenizers(src: Path, family: ModelFamily) -> dict[str, ClipTokenizer]:
    return {e.tokenizer: ClipTokenizer.from_folder(src / e.tokenizer) for e in family.text_encoders}


def read_configs(src: Path, family: ModelFamily) -> dict[str, dict]:
    """model_index, unet, vae, scheduler and text encoder configs of a diffusers folder."""
    return {
        "model_index": read_json(src / "model_index.json", "source model"),
        "unet": read_json(src / "unet" / "config.json", "U-Net"),
        "vae": read_json(src / "vae" / "config.json", "VAE"),
        "scheduler": read_json(src / "scheduler" / "scheduler_config.json", "scheduler"),
        **{c: read_json(src / c / "config.json", "text encoder") for c in family.text_components},
    }


def load_source(src: Path) -> SourceModel:
    """The family and configs of a diffusers folder; its networks load one at a time (`SourceModel.load`)."""
    family = check_source_folder(src)
    return SourceModel(src, family, read_configs(src, family), folder_tokenizers(src, family), FolderWeights(src))


def source_checksum(src: Path) -> str:
    """sha256 over every config and weight file of the source folder in path order (or of the single file)."""
    digest = hashlib.sha256()
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(src) if path != src else path.name).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
