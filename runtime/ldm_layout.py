"""Names of the original LDM / SGM checkpoint layout (A1111, ComfyUI, civitai files) for diffusers' weights.

Each function takes a diffusers state-dict key of one component and returns where that tensor lives in a
single-file checkpoint (without the component's prefix) and how to turn the stored tensor into diffusers'.
Going from diffusers' names keeps every rule in one direction: the converter asks for each weight the model
needs, so a weight the file lacks and a file key nothing asked for are both found.

Layouts (CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py`, Stability-AI/generative-models
`sgm/`): the U-Net's `input_blocks.N` count (resnet, attention) pairs and the downsampler of each level in one
sequence, `output_blocks.N` likewise with one more layer per level; the VAE's decoder levels run in reverse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgesd.errors import EdgesdError

# How a stored tensor becomes diffusers': as it is, the k-th of n equal rows slices (OpenCLIP's fused q/k/v),
# transposed (OpenCLIP's text_projection) or reshaped (the VAE attention's 1x1 convolutions -> linear layers).
Transform = Literal["none", "transpose", "reshape"] | tuple[int, int]


@dataclass(frozen=True)
class Stored:
    key: str
    transform: Transform = "none"


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _layers_per_block(config: dict) -> int:
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise EdgesdError(f"U-Net layers_per_block {layers} differs per block; the LDM layout has one number",
                          "convert this model with the tool that made it")
    return layers


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    if layer not in _RESNET:
        raise KeyError(rest)
    return f"{_RESNET[layer]}.{tail}"


def unet_key(key: str, config: dict) -> Stored:
    """`down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight` (no
    `model.diffusion_model.` prefix)."""
    per_level = _layers_per_block(config) + 1  # resnets (+ attentions) of a level, then its down/upsampler
    for name, stored in _UNET_TOP.items():
        if key.startswith(name + "."):
            return Stored(stored + key[len(name):])
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return Stored(f"input_blocks.{1 + level * per_level + per_level - 1}.0.op.{rest.removeprefix('conv.')}")
        index = 1 + level * per_level + j
        return Stored(f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}")
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[1] == "attentions":
            return Stored(f"middle_block.1.{m[3]}")
        return Stored(f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}")
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config["up_block_types"][level]
            return Stored(f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}.{rest}")
        index = level * per_level + j
        return Stored(f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}")
    raise KeyError(key)


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, config: dict) -> Stored:
    """`decoder.up_blocks.0.resnets.1.conv1.weight` -> `decoder.up.3.block.1.conv1.weight` (no
    `first_stage_model.` prefix); the mid attention's linear layers are stored as 1x1 convolutions."""
    if key.startswith(("quant_conv.", "post_quant_conv.")) or re.match(r"(en|de)coder\.conv_(in|out)\.", key):
        return Stored(key)
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key)
    if m:
        return Stored(f"{m[1]}.norm_out.{m[2]}")
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[2] == "resnets":
            return Stored(f"{m[1]}.mid.block_{int(m[3]) + 1}.{m[4].replace('conv_shortcut', 'nin_shortcut')}")
        for name, stored in _VAE_ATTENTION.items():
            if m[4].startswith(name + "."):
                tail = m[4][len(name) + 1:]
                return Stored(f"{m[1]}.mid.attn_1.{stored}.{tail}", "reshape" if tail == "weight" else "none")
        raise KeyError(key)
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, level, kind, j, rest = m[1], int(m[3]), m[4], m[5], m[6]
        if side == "decoder":
            level = len(config["up_block_types"]) - 1 - level
        stored_level = f"{side}.{m[2]}.{level}"
        if kind == "resnets":
            return Stored(f"{stored_level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}")
        return Stored(f"{stored_level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}")
    raise KeyError(key)


def hf_clip_key(key: str) -> Stored:
    """A transformers CLIP text model stored as it is (SD 1.x `cond_stage_model.transformer.`, SDXL's first
    encoder); keys always with the `text_model.` prefix (transformers 4.x), which the loader matches to 5.x."""
    return Stored(key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key)


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_key(key: str) -> Stored:
    """A transformers CLIP key -> OpenCLIP's (SD 2.x `cond_stage_model.model.`, SDXL `conditioner.embedders.1.
    model.`): q/k/v are thirds of one `in_proj`, the projection is stored transposed."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if key in fixed:
        return Stored(fixed[key])
    if key == "text_projection.weight":
        return Stored("text_projection", "transpose")
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        layer, module, kind = m[1], m[2], m[3]
        qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
        if module in qkv:
            return Stored(f"transformer.resblocks.{layer}.attn.in_proj_{kind}", (qkv[module], 3))
        if module in _OPEN_CLIP_LAYER:
            return Stored(f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{kind}")
    raise KeyError(key)
