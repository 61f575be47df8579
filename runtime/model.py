"""A model folder on disk: edgesd's own export or one written by `optimum-cli export onnx`.

Both use optimum's layout (`text_encoder/model.onnx`, `unet/model.onnx`,
`vae_decoder/model.onnx`, `tokenizer/`, `scheduler/scheduler_config.json`); OpenVINO IR folders (ours with
`--format openvino`, or `optimum-cli export openvino`) have `openvino_model.xml` + `.bin` in place of each
`model.onnx`.
Ours adds `edgesd.json`, the manifest: each graph's description and the model's
constants. For a folder without it, the constants come from the component
`config.json` files that optimum copies next to each graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import EdgesdError
from .families import ModelFamily, detect_family
from .graphs import REQUIRED_FOR_TEXT_TO_IMAGE, UNET_TOME, GraphSpec

MANIFEST = "edgesd.json"
MANIFEST_VERSION = 1
GRAPH_FILE = "model.onnx"
IR_FILE = "openvino_model.xml"  # OpenVINO IR; its weights are in openvino_model.bin beside it
GRAPH_FILES = {"onnx": GRAPH_FILE, "openvino": IR_FILE}
# ONNX graphs kept in another component's folder, reading its weights file: component -> (folder, file)
BESIDE = {UNET_TOME: ("unet", "model_tome.onnx")}


@dataclass(frozen=True)
class ModelConstants:
    latent_channels: int  # U-Net in/out channels (4 for SD 1.x/2.x)
    vae_scale_factor: int  # image pixels per latent pixel, 2 ** (VAE down blocks - 1)
    vae_scaling_factor: float  # latents are multiplied by this before the U-Net (0.18215 for SD 1.x)
    sample_size: int  # the U-Net's native latent size; default image side = sample_size * vae_scale_factor
    text_max_length: int  # tokens per prompt (77)
    text_hidden_size: int  # width of the text encoder's hidden states
    prediction_type: str  # what the U-Net predicts: epsilon | v_prediction | sample
    latent_size_multiple: int  # latent sides must divide by this: 2 ** (U-Net down blocks - 1)

    def check(self, where: str) -> None:
        """Raise EdgesdError for a constant that cannot be right (a hand-edited or hostile edgesd.json)."""
        for name in ("latent_channels", "vae_scale_factor", "sample_size", "text_max_length", "text_hidden_size",
                     "latent_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 16:
                raise EdgesdError(f"{where}: constant {name}={value!r} must be a whole number from 1 to 65536",
                                  "re-export the model")
        factor = self.vae_scaling_factor
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor < 1e6:
            raise EdgesdError(f"{where}: constant vae_scaling_factor={factor!r} must be a positive number",
                              "re-export the model")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise EdgesdError(f"{where}: prediction_type {self.prediction_type!r} is not epsilon, v_prediction or "
                              "sample", "re-export the model")

    @property
    def default_image_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def image_size_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_size_multiple


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's own defaults, for models trained to work best away from SD's 20 steps / guidance 7.5."""

    num_inference_steps: int = 20
    guidance_scale: float = 7.5

    def check(self, where: str) -> None:
        steps, guidance = self.num_inference_steps, self.guidance_scale
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
            raise EdgesdError(f"{where}: default steps {steps!r} must be a whole number from 1 to 1000",
                              "fix or re-export the model")
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance < 1e4:
            raise EdgesdError(f"{where}: default guidance {guidance!r} must be a number >= 0",
                              "fix or re-export the model")


def constants_from_configs(unet: dict, vae: dict, text_encoder: dict, scheduler: dict) -> ModelConstants:
    """The model constants from diffusers/transformers component configs (exporter and runtime both use this)."""
    sample_size = unet.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return ModelConstants(
        latent_channels=int(unet.get("out_channels", unet.get("in_channels", 4))),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1),
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        sample_size=int(sample_size),
        text_max_length=int(text_encoder.get("max_position_embeddings", 77)),
        text_hidden_size=int(unet.get("cross_attention_dim", text_encoder.get("hidden_size", 768))),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        latent_size_multiple=2 ** (len(unet.get("block_out_channels", [0, 0, 0, 0])) - 1),
    )


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgesdError(f"{path} is missing", f"the {what} needs it; re-export the model") from None
    except (OSError, ValueError) as e:
        raise EdgesdError(f"{path} is not valid JSON ({e})", f"fix or re-export the {what}") from None
    if not isinstance(data, dict):
        raise EdgesdError(f"{path} does not hold a JSON object", f"fix or re-export the {what}")
    return data


# Component configs a model folder keeps beside its graphs (ours and optimum's), read when present.
CONFIG_FILES = {"model_index": "model_index.json", "unet": "unet/config.json",
                "text_encoder": "text_encoder/config.json", "text_encoder_2": "text_encoder_2/config.json",
                "vae": "vae_decoder/config.json"}


@dataclass(frozen=True)
class ModelFolder:
    root: Path
    constants: ModelConstants
    scheduler_config: dict
    manifest: dict | None  # None for folders edgesd did not write
    defaults: GenerationDefaults = GenerationDefaults()
    configs: dict[str, dict] = field(default_factory=dict)  # CONFIG_FILES that exist, by key
    family: ModelFamily | None = None

    @cached_property
    def specs(self) -> dict[str, GraphSpec]:
        """Every graph of this model's family, described from its configs (computed once)."""
        return self.family.graph_specs(self.configs)

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        root = Path(path)
        if not root.exists():
            raise EdgesdError(f"model folder '{root}' does not exist", "pass the folder `edgesd export` wrote")
        if not root.is_dir():
            raise EdgesdError(f"'{root}' is not a folder", "pass the model folder, not a file in it")
        for component in REQUIRED_FOR_TEXT_TO_IMAGE:
            if graph_format(root, component) is None:
                raise EdgesdError(
                    f"'{root}' has no {component}/{GRAPH_FILE} or {component}/{IR_FILE}",
                    "pass a folder written by `edgesd export` or `optimum-cli export onnx|openvino`",
                )
        scheduler = read_json(root / "scheduler" / "scheduler_config.json", "scheduler")
        manifest = read_json(root / MANIFEST, "manifest") if (root / MANIFEST).is_file() else None
        if manifest is not None:
            if manifest.get("format_version") != MANIFEST_VERSION:
                raise EdgesdError(f"{root / MANIFEST} has format version {manifest.get('format_version')}",
                                  f"this edgesd reads version {MANIFEST_VERSION}; re-export the model")
            try:
                constants = ModelConstants(**manifest["constants"])
            except (KeyError, TypeError) as e:
                raise EdgesdError(f"{root / MANIFEST} has unreadable constants ({e})", "re-export the model") from None
        else:
            constants = constants_from_configs(
                read_json(root / "unet" / "config.json", "U-Net"),
                read_json(root / "vae_decoder" / "config.json", "VAE decoder"),
                read_json(root / "text_encoder" / "config.json", "text encoder"),
                scheduler,
            )
        configs = {key: read_json(root / name, key.replace("_", " ")) for key, name in CONFIG_FILES.items()
                   if (root / name).is_file()}
        constants.check(str(root / MANIFEST) if manifest is not None else str(root))
        family = detect_family(configs.get("model_index", {}), configs.get("unet", {}), str(root))
        defaults = GenerationDefaults(family.default_steps, family.default_guidance)
        if manifest is not None and "defaults" in manifest:
            try:
                defaults = GenerationDefaults(**manifest["defaults"])
            except TypeError as e:
                raise EdgesdError(f"{root / MANIFEST} has unreadable defaults ({e})", "re-export the model") from None
            defaults.check(str(root / MANIFEST))
        return cls(root=root, constants=constants, scheduler_config=scheduler, manifest=manifest, defaults=defaults,
                   configs=configs, family=family)

    def graph_format(self, component: str) -> str | None:
        """"onnx", "openvino" (IR) or None when the component is absent."""
        return graph_format(self.root, component)

    def graph_path(self, component: str) -> Path:
        if component in BESIDE:
            return self.root.joinpath(*BESIDE[component])
        return self.root / component / GRAPH_FILES[self.graph_format(component) or "onnx"]

    def has(self, component: str) -> bool:
        return self.graph_format(component) is not None


def graph_format(root: Path, component: str) -> str | None:
    """Which graph file `root/component` holds; both at once is an error (which one would run is unclear)."""
    if component in BESIDE:
        return "onnx" if root.joinpath(*BESIDE[component]).is_file() else None
    found = [fmt for fmt, name in GRAPH_FILES.items() if (root / component / name).is_file()]
    if len(found) > 1:
        raise EdgesdError(f"'{root / component}' holds both {GRAPH_FILE} and {IR_FILE}",
                          "keep one: delete the other file (and its weights) or re-export into an empty folder")
    if found == ["openvino"] and not (root / component / "openvino_model.bin").is_file():
        raise EdgesdError(f"'{root / component}' has {IR_FILE} but no openvino_model.bin (its weights)",
                          "copy the .bin file next to it or re-export the model")
    return found[0] if found else None


def write_manifest(root: Path, constants: ModelConstants, graphs: dict[str, dict], source: dict,
                   specs: dict[str, GraphSpec], family: str, defaults: GenerationDefaults | None = None) -> None:
    """Write edgesd.json: the family, the graphs (as their family describes them, plus precision and file),
    constants, source."""
    manifest = {
        "format_version": MANIFEST_VERSION,
        "family": family,
        "constants": asdict(constants),
        "source": source,
        "graphs": {
            name: {**specs[name].to_json(), **extra} for name, extra in graphs.items()
        },
    }
    if defaults is not None:
        manifest["defaults"] = asdict(defaults)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class VaeSettings:
    """How latents are scaled for a VAE and the tile size its pictures are cut into (its config's
    sample_size, as diffusers' tiling takes it)."""

    scaling_factor: float  # latents = VAE latents * scaling_factor (TAESD: 1, it decodes scaled latents)
    sample_size: int  # pixels per tile side when tiled
    latent_channels: int

    @classmethod
    def from_config(cls, config: dict, fallback_size: int) -> "VaeSettings":
        size = config.get("sample_size", fallback_size)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return cls(float(config.get("scaling_factor", 0.18215)), int(size), int(config.get("latent_channels", 4)))


# TAESD's config names no sample size; its tiles are SD 1.x's.
TINY_VAE_TILE = 512


@dataclass(frozen=True)
class DecoderFolder:
    """A VAE decoder exported on its own (`edgesd export TAESD_DIR OUT`), to decode another model's latents."""

    root: Path
    config: dict

    @classmethod
    def open(cls, path: str | Path) -> "DecoderFolder":
        root = Path(path)
        if not root.is_dir():
            raise EdgesdError(f"VAE decoder folder '{root}' does not exist", "pass the folder `edgesd export` wrote "
                              "from a diffusers AutoencoderTiny / AutoencoderKL folder")
        if graph_format(root, "vae_decoder") is None:
            if (root / "config.json").is_file():
                raise EdgesdError(f"'{root}' is a diffusers VAE folder, not an exported decoder",
                                  f"export it first: edgesd export {root} OUT, then pass OUT")
            raise EdgesdError(f"'{root}' has no vae_decoder/{GRAPH_FILE} or vae_decoder/{IR_FILE}",
                              "pass the folder `edgesd export` wrote from a VAE folder")
        return cls(root, read_json(root / "vae_decoder" / "config.json", "VAE decoder"))

    def graph_path(self) -> Path:
        return self.root / "vae_decoder" / GRAPH_FILES[graph_format(self.root, "vae_decoder")]

    def settings(self) -> VaeSettings:
        return VaeSettings.from_config(self.config, TINY_VAE_TILE)
