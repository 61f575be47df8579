"""Single-file checkpoints (`model.safetensors` in the original LDM / SGM layout) as a source of the exporter.

The family is read from the file's keys and shapes; the configs of the real architectures ship in
`export/configs/` (sources in its SOURCES.md), or come from `--config DIR` (a diffusers folder; weights not
needed). Every tensor of the file is either converted or on a short list of known non-weights (EMA copies,
the DDPM schedule, training-only layers); anything else is an error naming it. Only safetensors are read:
pickle files (.ckpt, .pt, .bin) can run code when loaded and are refused.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from edgesd.errors import EdgesdError
from edgesd.families import ModelFamily, detect_family
from edgesd.tokenizer import EOS, ClipTokenizer, packaged_vocab

from edgesd import ldm_layout
from edgesd.ldm_layout import Stored

CONFIGS = Path(__file__).parent / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PredictionType = Literal["epsilon", "v_prediction"]
_UNET_PREFIX, _VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# Tensors of LDM / SGM checkpoints that are not part of the networks diffusers runs.
_NOT_WEIGHTS = re.compile(
    r"model_ema\..*|(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)"
    r"|first_stage_model\.loss\..*|denoiser\..*|.*\.position_ids|.*\.logit_scale"
)


@dataclass(frozen=True)
class TextLayout:
    component: str  # text_encoder / text_encoder_2
    prefix: str
    key: Callable[[str], Stored]  # transformers key -> stored key
    unused: Callable[[str, dict], bool] = lambda key, config: False  # stored keys the model does not use


def _open_clip_unused(key: str, config: dict) -> bool:
    """SD 2.x runs OpenCLIP without its last layer (penultimate hidden state) and without its projection."""
    m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return bool(m and int(m[1]) >= config["num_hidden_layers"]) or (
        key == "text_projection" and "CLIPTextModelWithProjection" not in config.get("architectures", []))


@dataclass(frozen=True)
class Layout:
    """One kind of single-file checkpoint: where its text encoders are stored and which configs describe it."""

    name: str
    title: str
    configs: str  # folder under export/configs
    text: tuple[TextLayout, ...]


LAYOUTS = {
    "sd1": Layout("sd1", "SD 1.x", "sd15", (
        TextLayout("text_encoder", "cond_stage_model.transformer.", ldm_layout.hf_clip_key),)),
    "sd2": Layout("sd2", "SD 2.x", "sd21-v", (
        TextLayout("text_encoder", "cond_stage_model.model.", ldm_layout.open_clip_key, _open_clip_unused),)),
    "sdxl": Layout("sdxl", "SDXL", "sdxl-base", (
        TextLayout("text_encoder", "conditioner.embedders.0.transformer.", ldm_layout.hf_clip_key),
        TextLayout("text_encoder_2", "conditioner.embedders.1.model.", ldm_layout.open_clip_key,
                   _open_clip_unused))),
}


def refuse_pickle(path: Path, what: str = "checkpoint") -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EdgesdError(
            f"'{path}' is a pickle file ({path.suffix}); edgesd never unpickles files, which can run code",
            f"convert the {what} to .safetensors where you trust it (torch.load(..., weights_only=True), then "
            "safetensors.torch.save_file), or download its .safetensors version")


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the safetensors header (no data read)."""
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise EdgesdError(f"'{path}' is not a .safetensors file", "pass a .safetensors checkpoint or a diffusers folder")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(size - 8, 100 << 20):
                raise ValueError("bad header length")
            header = json.loads(f.read(length))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgesdError(f"cannot read '{path}' as safetensors ({str(e)[:80]})",
                          "the file is corrupt or truncated; download it again") from None


def detect_layout(shapes: dict[str, tuple[int, ...]], where: str) -> tuple[Layout, bool]:
    """The layout of a checkpoint and whether its U-Net is a 9-channel inpainting one."""
    conv_in = shapes.get(_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) for k in shapes):
            raise EdgesdError(f"'{where}' is a LoRA file, not a model", "pass it with --lora FILE:SCALE")
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in shapes):
            raise EdgesdError(f"'{where}' holds one diffusers component, not a whole model",
                              "pass the diffusers folder, or the component with --vae")
        raise EdgesdError(f"'{where}' has no Stable Diffusion U-Net ({_UNET_PREFIX}* keys)",
                          "pass an SD 1.x / 2.x / XL checkpoint or a diffusers folder")
    channels = conv_in[1]
    if channels not in (4, 9):
        raise EdgesdError(f"'{where}': a U-Net with {channels} input channels is not supported (4, or 9 for "
                          "inpainting)", "edgesd runs text-to-image, img2img and inpainting models")
    if "conditioner.embedders.1.model.ln_final.weight" in shapes:
        layout = LAYOUTS["sdxl"]
    elif any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise EdgesdError(f"'{where}' is an SDXL refiner, which is not supported", "export the SDXL base model")
    elif "cond_stage_model.model.ln_final.weight" in shapes:
        layout = LAYOUTS["sd2"]
    elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        layout = LAYOUTS["sd1"]
    else:
        raise EdgesdError(f"'{where}' has no text encoder edgesd knows (cond_stage_model.* or conditioner.*)",
                          "pass an SD 1.x / 2.x / XL checkpoint")
    return layout, channels == 9


def yaml_prediction_type(path: Path) -> PredictionType | None:
    """A1111's convention: `model.yaml` beside `model.safetensors` (the LDM inference config) says
    `parameterization: "v"` for a v-prediction model. Read as text, only that line."""
    config = path.with_suffix(".yaml")
    if not config.is_file():
        return None
    try:
        text = config.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.MULTILINE)
    return {"v": "v_prediction", "eps": "epsilon"}.get(m[1]) if m else None


def _read_tokenizer(folder: Path) -> ClipTokenizer:
    """A tokenizer folder with a vocabulary, or one with only its special tokens (the shipped configs)."""
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return ClipTokenizer.from_folder(folder)
    pad = EOS
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as in transformers
        if (folder / name).is_file():
            value = json.loads((folder / name).read_text()).get("pad_token", pad)
            pad = value.get("content", pad) if isinstance(value, dict) else value
    vocab, merges = packaged_vocab()
    return ClipTokenizer(vocab, merges, pad_token=pad)


def _read_config_folder(root: Path) -> dict[str, dict]:
    from .loading import read_configs, read_json

    for name in ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        if not (root / name).is_file():
            raise EdgesdError(f"config folder '{root}' has no {name}", "pass a diffusers folder (weights not needed)")
    family = detect_family(read_json(root / "model_index.json", "model index"),
                           read_json(root / "unet" / "config.json", "U-Net"), str(root))
    return read_configs(root, family)


def _shipped_configs(layout: Layout, inpaint: bool, prediction_type: PredictionType | None
                     ) -> tuple[dict[str, dict], list[str]]:
    """The configs of the real architecture of `layout`, adjusted to inpainting and the prediction type."""

    root = CONFIGS / layout.configs
    if inpaint and layout.name == "sd1":
        root = CONFIGS / "sd15-inpainting"
    configs = copy.deepcopy(_read_config_folder(root))
    notes = []
    if inpaint and layout.name != "sd1":  # same architecture with 9 input channels (latents, mask, masked image)
        configs["unet"]["in_channels"] = 9
        configs["model_index"]["_class_name"] = configs["model_index"]["_class_name"].replace("Pipeline", "InpaintPipeline")
    if layout.name == "sd2":
        chosen = prediction_type or "epsilon"
        if prediction_type is None:
            notes.append("an SD 2.x file does not say its prediction type: assumed epsilon at 512x512 (SD 2.x base, "
                         "SD-Turbo); pass --prediction-type v_prediction for a 768-v model")
        big = chosen == "v_prediction"  # SD 2.x 768-v; the epsilon models are 512
        configs["unet"]["sample_size"], configs["vae"]["sample_size"] = (96, 768) if big else (64, 512)
        configs["scheduler"]["prediction_type"] = chosen
    elif prediction_type is not None:
        configs["scheduler"]["prediction_type"] = prediction_type
    return configs, notes


@dataclass(frozen=True)
class SingleFileWeights:
    """The tensors of one single-file checkpoint, converted to diffusers' names component by component."""

    path: Path
    layout: Layout
    configs: dict[str, dict]
    keys: frozenset[str]

    def _stored(self, folder: str) -> tuple[str, Callable[[str], Stored], Callable[[str, dict], bool]]:
        if folder == "unet":
            return _UNET_PREFIX, lambda k: ldm_layout.unet_key(k, self.configs["unet"]), lambda k, c: False
        if folder == "vae":
            return _VAE_PREFIX, lambda k: ldm_layout.vae_key(k, self.configs["vae"]), lambda k, c: False
        text = next(t for t in self.layout.text if t.component == folder)
        return text.prefix, text.key, text.unused

    def plan(self, folder: str, expected: dict[str, tuple]) -> dict[str, Stored]:
        """diffusers key -> where it is stored (with the component's prefix); a key that has no place in the
        LDM layout is an error (the config does not describe an LDM model)."""
        prefix, key_of, _ = self._stored(folder)
        plan = {}
        for key in expected:
            if key.endswith("position_ids"):
                continue
            try:
                stored = key_of(key)
            except KeyError:
                raise EdgesdError(f"{folder}: the weight {key} has no place in the LDM checkpoint layout",
                                  "the config does not describe this model; pass --config DIR") from None
            name = prefix + stored.key
            if name not in self.keys and name.startswith(prefix + "text_model."):  # CLIP saved before the prefix
                name = prefix + stored.key.removeprefix("text_model.")
            plan[key] = Stored(name, stored.transform)
        return plan

    def state(self, folder: str, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        plan = self.plan(folder, expected)
        state = {}
        with safe_open(str(self.path), framework="pt") as f:
            for key, stored in plan.items():
                if stored.key not in self.keys:
                    raise EdgesdError(f"'{self.path.name}' lacks {stored.key} ({folder} {key})",
                                      "the checkpoint is incomplete, or of another architecture: pass --config DIR")
                state[key] = _transform(f.get_tensor(stored.key).float(), stored.transform, expected[key], key)
        return state


def _transform(tensor: torch.Tensor, transform, shape, key: str) -> torch.Tensor:
    if isinstance(transform, tuple):  # the k-th of n row slices
        k, n = transform
        rows = tensor.shape[0] // n
        tensor = tensor[k * rows:(k + 1) * rows]
    elif transform == "transpose":
        tensor = tensor.T
    elif transform == "reshape" and tensor.numel() == torch.Size(shape).numel():
        tensor = tensor.reshape(shape)
    if tuple(tensor.shape) != tuple(shape):
        raise EdgesdError(f"{key}: the checkpoint's tensor has shape {tuple(tensor.shape)}, the model needs "
                          f"{tuple(shape)}", "the config does not match this checkpoint; pass --config DIR")
    return tensor.contiguous()


def _stored_shape(shape: tuple, transform) -> tuple:
    """The shape a stored tensor has once transformed (a reshape keeps only its element count)."""
    if isinstance(transform, tuple):
        return (shape[0] // transform[1], *shape[1:])
    if transform == "transpose":
        return tuple(reversed(shape))
    if transform == "reshape":  # VAE attention: (C, C, 1, 1) stored, (C, C) used
        return tuple(d for d in shape if d != 1) if len(shape) == 4 else tuple(shape)
    return tuple(shape)


def _expected_shapes(folder: str, config: dict, projected: bool) -> dict[str, tuple]:
    """Every state-dict key and shape of a component, built on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if folder.startswith("text_encoder"):
            model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(CLIPTextConfig.from_dict(config))
        else:
            model = (UNet2DConditionModel if folder == "unet" else AutoencoderKL).from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_coverage(weights: SingleFileWeights, family: ModelFamily, shapes: dict[str, tuple]) -> None:
    """Every tensor of the file is used by some component or known not to be a weight; else an error naming it."""
    used: set[str] = set()
    folders = ("unet", "vae", *family.text_components)
    unused_rules = [(t.prefix, t.unused, weights.configs[t.component]) for t in weights.layout.text]
    for folder in folders:
        expected = _expected_shapes(folder, weights.configs[folder], family.projected(folder))
        plan = weights.plan(folder, expected)
        for key, stored in plan.items():
            if stored.key not in shapes:
                raise EdgesdError(f"'{weights.path.name}' lacks {stored.key} ({folder} {key})",
                                  "the checkpoint is incomplete, or of another architecture: pass --config DIR")
            if _stored_shape(shapes[stored.key], stored.transform) != tuple(expected[key]):
                raise EdgesdError(f"{stored.key} has shape {shapes[stored.key]}, the {folder} config needs "
                                  f"{tuple(expected[key])} ({key})",
                                  "the config does not match this checkpoint; pass --config DIR")
        used |= {s.key for s in plan.values()}
    left = [k for k in shapes if k not in used and not _NOT_WEIGHTS.fullmatch(k)
            and not any(k.startswith(p) and rule(k[len(p):], cfg) for p, rule, cfg in unused_rules)]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise EdgesdError(f"'{weights.path.name}': tensors the converter does not map: {', '.join(sorted(left)[:3])}"
                          f"{more}", "this checkpoint has parts edgesd does not run; pass --config DIR if its "
                          "architecture differs")


def load_single_file(path: Path, config_dir: Path | None = None,
                     prediction_type: PredictionType | None = None):
    """A SourceModel over one single-file checkpoint."""
    from .loading import SourceModel

    shapes = read_shapes(path)
    layout, inpaint = detect_layout(shapes, str(path))
    notes: list[str] = []
    if config_dir is not None:
        config_dir = Path(config_dir)
        if not config_dir.is_dir():
            raise EdgesdError(f"config folder '{config_dir}' does not exist", "pass a diffusers folder's path")
        configs = _read_config_folder(config_dir)
        if prediction_type is not None:
            configs["scheduler"]["prediction_type"] = prediction_type
        tokenizer_root = config_dir
    else:
        configs, notes = _shipped_configs(layout, inpaint, prediction_type or yaml_prediction_type(path))
        tokenizer_root = CONFIGS / layout.configs
    family = detect_family(configs["model_index"], configs["unet"], str(config_dir or path))
    if [t.component for t in layout.text] != list(family.text_components):
        raise EdgesdError(f"'{path.name}' is an {layout.title} checkpoint but the config is {family.title}",
                          "pass the config folder of the checkpoint's architecture")
    if (configs["unet"].get("in_channels", 4) == 9) != inpaint:
        raise EdgesdError(f"'{path.name}' has a {9 if inpaint else 4}-channel U-Net but the config says "
                          f"{configs['unet'].get('in_channels', 4)}", "pass the matching --config DIR")
    tokenizers = {e.tokenizer: _read_tokenizer(tokenizer_root / e.tokenizer) if (tokenizer_root / e.tokenizer).is_dir()
                  else ClipTokenizer(*packaged_vocab(), pad_token=EOS) for e in family.text_encoders}
    weights = SingleFileWeights(path, layout, configs, frozenset(shapes))
    check_coverage(weights, family, shapes)
    return SourceModel(path, family, configs, tokenizers, weights, notes=tuple(notes))


# --- a VAE from elsewhere (--vae FILE|DIR) ----------------------------------------------------------------

@dataclass(frozen=True)
class VaeFile:
    """A VAE in one .safetensors file: diffusers' names (diffusion_pytorch_model.safetensors) or the LDM ones
    (`vae-ft-mse-840000-ema-pruned.safetensors`, optionally with `first_stage_model.`)."""

    path: Path
    config: dict

    def state(self, folder: str, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            keys = set(f.keys())
            if any(k.startswith("encoder.down_blocks.") or k.startswith("decoder.up_blocks.") for k in keys):
                return {k: f.get_tensor(k).float() for k in keys}
            prefix = _VAE_PREFIX if any(k.startswith(_VAE_PREFIX) for k in keys) else ""
            state, used = {}, set()
            for key, shape in expected.items():
                stored = ldm_layout.vae_key(key, self.config)
                name = prefix + stored.key
                if name not in keys:
                    raise EdgesdError(f"VAE file '{self.path.name}' lacks {name}", "pass a complete VAE")
                state[key] = _transform(f.get_tensor(name).float(), stored.transform, shape, key)
                used.add(name)
            left = [k for k in keys if k not in used and not _NOT_WEIGHTS.fullmatch(k)
                    and not k.startswith(prefix + "loss.")]
            if left:
                raise EdgesdError(f"VAE file '{self.path.name}' has tensors no VAE layer takes: {sorted(left)[:3]}",
                                  "pass a VAE of the model's kind")
            return state


def vae_override(path: Path, config: dict):
    """The weight source of --vae: a diffusers VAE folder, or one .safetensors file."""
    from .loading import FolderWeights, read_json

    path = Path(path)
    if not path.exists():
        raise EdgesdError(f"--vae '{path}' does not exist", "pass a VAE .safetensors file or a diffusers vae/ folder")
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise EdgesdError(f"--vae folder '{path}' has no config.json", "pass a diffusers vae/ folder")
        theirs = read_json(path / "config.json", "VAE")
        if theirs.get("latent_channels", 4) != config.get("latent_channels", 4):
            raise EdgesdError(f"--vae '{path}' has {theirs.get('latent_channels')} latent channels, the model "
                              f"{config.get('latent_channels', 4)}", "pass a VAE made for this model")
        return _ParentFolderWeights(FolderWeights(path.parent), path.name), theirs
    refuse_pickle(path, "VAE")
    read_shapes(path)
    return VaeFile(path, config), config


@dataclass(frozen=True)
class _ParentFolderWeights:
    """A diffusers folder's VAE read from a folder whatever its name."""

    weights: object
    name: str

    def state(self, folder: str, expected):
        return self.weights.state(self.name, expected)

