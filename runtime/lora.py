"""LoRA files: kohya / A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*` / `lora_te2_*`, LoCon convolutions) and
diffusers / PEFT (`unet.*.lora_A.weight`), read into one weight delta per layer (Hu et al. 2021, eq. 3):

    W' = W + scale * (alpha / rank) * up @ down        # up (out, r), down (r, in[, kh, kw])

Used by the exporter (merged before tracing) and by the runtime (added to the graphs' weights when loading).
A key that matches no layer, or a shape that does not fit it, is an error naming it, with a guess of the
family the LoRA was made for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ldm_layout
from .errors import EdgesdError
from .tensor_files import read_safetensors

# The components a LoRA changes, and each one's kohya key prefixes.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_PEFT = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# (down, up) part names of each format
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
          "lora.down.weight": "down", "lora.up.weight": "up", "alpha": "alpha"}
# LyCORIS kinds that are not a plain low-rank pair; named in the error.
_OTHER_KINDS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with a Tucker core", "dora_scale": "DoRA",
                "oft_": "OFT", "diff": "a full weight difference"}  # how the key's last part begins
WEIGHT_MAP = "weights.json"  # per graph folder: diffusers weight name -> the graph constant holding it


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """`FILE` or `FILE:SCALE` (the scale after the last colon, when it is a number)."""
        head, sep, tail = str(text).rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text))

    def __str__(self) -> str:
        return f"{self.path.name}:{self.scale:g}"


@dataclass(frozen=True)
class _Pair:
    down: np.ndarray
    up: np.ndarray
    alpha: float | None


@dataclass(frozen=True)
class LowRankDelta:
    """A weight's change as a sum of scaled low-rank products, made dense only when it is added to the weight
    (so a LoRA over a whole U-Net costs its file's size, not the U-Net's, until then)."""

    shape: tuple[int, ...]  # the weight's, in diffusers' layout
    terms: tuple[tuple[np.ndarray, np.ndarray, float], ...]  # (up (out, r), down (r, in * kh * kw), factor)
    transposed: bool = False  # the graph stores the weight transposed

    def __add__(self, other: "LowRankDelta") -> "LowRankDelta":
        return LowRankDelta(self.shape, self.terms + other.terms, self.transposed)

    def dense(self) -> np.ndarray:
        out = np.zeros((self.shape[0], int(np.prod(self.shape[1:]))), np.float32)
        for up, down, factor in self.terms:
            out += factor * (up @ down)
        out = out.reshape(self.shape)
        return np.ascontiguousarray(out.T) if self.transposed else out


def _kohya_index(component: str, names: dict[str, tuple], unet_config: dict | None) -> dict[str, str]:
    """kohya's underscored module name -> weight name; the U-Net under diffusers' names and SGM's (SDXL)."""
    index = {}
    for name in names:
        module = name.removesuffix(".weight")
        index[module.replace(".", "_")] = name
        if component.startswith("text_encoder"):  # kohya names always carry text_model; transformers 5 may not
            index[("text_model." + module.removeprefix("text_model.")).replace(".", "_")] = name
        if component == "unet" and unet_config is not None:
            try:
                index[ldm_layout.unet_key(name, unet_config).key.removesuffix(".weight").replace(".", "_")] = name
            except (KeyError, EdgesdError):
                pass
    return index


def _group(tensors: dict[str, np.ndarray], where: str) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(component, module key) -> {down, up, alpha}."""
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        last = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]  # hada_w1_a, lora_mid, ...
        for marker, kind in _OTHER_KINDS.items():
            if last.startswith(marker):
                raise EdgesdError(f"LoRA '{where}' is {kind} ({key}); edgesd applies plain LoRA / LoCon pairs",
                                  "use a LoRA / LoCon file, or merge this one into the checkpoint with its tool")
        part = next((p for p in _PARTS if key.endswith("." + p)), None)
        prefix = next((p for p in (*_KOHYA, *_PEFT) if key.startswith(p)), None)
        if part is None or prefix is None:
            raise EdgesdError(f"LoRA '{where}': the key {key} is not a LoRA weight edgesd knows",
                              "use a kohya / A1111 or diffusers / PEFT LoRA file")
        component = {**_KOHYA, **_PEFT}[prefix]
        module = key[len(prefix):-len(part) - 1]
        groups.setdefault((component, module), {})[_PARTS[part]] = value
    return groups


def _guess_family(groups) -> str:
    """What a LoRA was made for, from its keys and the cross-attention width."""
    if any(c == "text_encoder_2" for c, _ in groups) or any("input_blocks" in m for _, m in groups):
        return "SDXL"
    for (component, module), parts in groups.items():
        if component == "unet" and ("attn2_to_k" in module or "attn2.to_k" in module) and "down" in parts:
            width = parts["down"].shape[1]
            return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width, f"a model with {width}-wide text")
    return "another model"


def _peft_alphas(metadata: dict[str, str]) -> dict[str, float]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = json.loads(raw)
    alphas = {}
    for component in LORA_COMPONENTS:
        if config.get(f"{component}.alpha_pattern") or config.get(f"{component}.rank_pattern"):
            raise EdgesdError("the LoRA's PEFT config has per-layer alpha or rank patterns",
                              "save it with one lora_alpha and r per component")
        if config.get(f"{component}.use_dora"):
            raise EdgesdError("the LoRA is DoRA (use_dora in its PEFT config); edgesd applies plain LoRA",
                              "use a plain LoRA, or merge this one into the checkpoint with its tool")
        if f"{component}.lora_alpha" in config:
            alpha = float(config[f"{component}.lora_alpha"])
            if config.get(f"{component}.use_rslora"):  # rank-stabilized: alpha / sqrt(r) instead of alpha / r
                alpha *= float(config[f"{component}.r"]) ** 0.5
            alphas[component] = alpha
    return alphas


def read_lora(spec: LoraSpec, targets: dict[str, dict[str, tuple]], family_title: str,
              unet_config: dict | None = None, unavailable: dict[str, str] | None = None
              ) -> dict[str, dict[str, LowRankDelta]]:
    """The weight changes of one LoRA (already scaled): component -> weight name -> LowRankDelta.
    `targets`: the weights a LoRA may change (component -> name -> shape); `unavailable`: components whose
    weights cannot change, and why (an error if the LoRA has keys for them)."""
    path = Path(spec.path)
    if not path.is_file():
        raise EdgesdError(f"LoRA '{path}' does not exist", "pass FILE:SCALE with the path of a .safetensors LoRA")
    if path.suffix.lower() != ".safetensors":
        raise EdgesdError(f"LoRA '{path}' is not a .safetensors file; edgesd never unpickles files",
                          "use the LoRA's .safetensors version")
    if not np.isfinite(spec.scale):
        raise EdgesdError(f"LoRA scale {spec.scale} is not a number", "use e.g. FILE:0.8")
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise EdgesdError(f"LoRA '{path}' holds no tensors", "pass a LoRA file")
    groups = _group(tensors, path.name)
    peft_alphas = _peft_alphas(metadata)
    indexes = {c: _kohya_index(c, names, unet_config) for c, names in targets.items()}
    deltas: dict[str, dict[str, LowRankDelta]] = {}
    for (component, module), parts in groups.items():
        if unavailable and component in unavailable:
            raise EdgesdError(f"LoRA '{path.name}' changes the {component}, but {unavailable[component]}",
                              "export the model with --lora FILE:SCALE instead, or load an fp32 / fp16 export")
        name = _target(component, module, targets, indexes)
        if name is None:
            key = next(k for k in tensors if module in k)
            where = "" if component in targets else f" (this {family_title} model has no {component})"
            raise EdgesdError(f"LoRA '{path.name}': {key} matches no layer of this {family_title} model{where}; "
                              f"it looks made for {_guess_family(groups)}", f"use a LoRA made for {family_title}")
        if "down" not in parts or "up" not in parts:
            raise EdgesdError(f"LoRA '{path.name}': {module} has no {'down' if 'up' in parts else 'up'} weight",
                              "the file is incomplete")
        pair = _Pair(parts["down"], parts["up"], float(parts["alpha"].reshape(-1)[0]) if "alpha" in parts
                     else peft_alphas.get(component))
        delta = _delta(pair, targets[component][name], spec.scale, f"{path.name}: {module}", family_title, groups)
        into = deltas.setdefault(component, {})
        into[name] = into[name] + delta if name in into else delta
    return deltas


def _target(component: str, module: str, targets, indexes) -> str | None:
    if component not in targets:
        return None
    names = targets[component]
    if module + ".weight" in names:  # PEFT: the module's own name
        return module + ".weight"
    if "text_model." + module + ".weight" in names:
        return "text_model." + module + ".weight"
    if module.removeprefix("text_model.") + ".weight" in names:
        return module.removeprefix("text_model.") + ".weight"
    return indexes[component].get(module)


def _delta(pair: _Pair, shape: tuple, scale: float, where: str, family_title: str, groups) -> LowRankDelta:
    rank = pair.down.shape[0]
    if pair.up.ndim < 2 or pair.up.shape[1] != rank:
        raise EdgesdError(f"LoRA {where}: up {pair.up.shape} and down {pair.down.shape} differ in rank",
                          "the file is corrupt")
    up, down = pair.up.reshape(pair.up.shape[0], rank), pair.down.reshape(rank, -1)  # (out, r), (r, in * kh * kw)
    if up.shape[0] * down.shape[1] != int(np.prod(shape)) or up.shape[0] != shape[0]:
        raise EdgesdError(f"LoRA {where} makes a {(up.shape[0], down.shape[1])} change, the layer is {tuple(shape)}; "
                          f"it looks made for {_guess_family(groups)}", f"use a LoRA made for {family_title}")
    alpha = rank if pair.alpha is None else pair.alpha
    return LowRankDelta(tuple(shape), ((up, down, scale * alpha / rank),))


def lora_deltas(loras: list[LoraSpec] | tuple[LoraSpec, ...], targets: dict[str, dict[str, tuple]],
                family_title: str, unet_config: dict | None = None, unavailable: dict[str, str] | None = None
                ) -> dict[str, dict[str, LowRankDelta]]:
    """The summed, scaled changes of several LoRAs: component -> weight name -> LowRankDelta."""
    total: dict[str, dict[str, LowRankDelta]] = {}
    for spec in loras:
        for component, deltas in read_lora(spec, targets, family_title, unet_config, unavailable).items():
            into = total.setdefault(component, {})
            for name, delta in deltas.items():
                into[name] = into[name] + delta if name in into else delta
    return total


@dataclass(frozen=True)
class WeightTarget:
    """Where a graph keeps one diffusers weight: a constant (initializer), maybe stored transposed."""

    constant: str
    shape: tuple[int, ...]
    transposed: bool = False


def read_weight_map(folder: Path) -> dict[str, WeightTarget] | None:
    path = Path(folder) / WEIGHT_MAP
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())["weights"]
        return {name: WeightTarget(e["constant"], tuple(e["shape"]), bool(e.get("transposed", False)))
                for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgesdError(f"{path} is unreadable ({e})", "re-export the model") from None


def write_weight_map(folder: Path, targets: dict[str, WeightTarget]) -> None:
    entries = {name: {"constant": t.constant, "shape": list(t.shape), "transposed": t.transposed}
               for name, t in targets.items()}
    (Path(folder) / WEIGHT_MAP).write_text(json.dumps({"format_version": 1, "weights": entries}, indent=1) + "\n")


def constant_deltas(deltas: dict[str, LowRankDelta], targets: dict[str, WeightTarget]) -> dict[str, LowRankDelta]:
    """Weight-name deltas -> deltas of the graph constants, in the layout each constant is stored."""
    return {targets[name].constant: LowRankDelta(d.shape, d.terms, targets[name].transposed)
            for name, d in deltas.items()}

