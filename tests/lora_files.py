"""Random LoRA files for the tests, in the two formats users hold: kohya / A1111 (written here, the way
sd-scripts names layers) and diffusers / PEFT (made by peft and saved by diffusers' own save_lora_weights)."""

from __future__ import annotations

from pathlib import Path

import torch

# Layers a kohya LoRA trains: attention projections and feed-forward (LoRA), resnet convolutions (LoCon).
_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
              "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _pair(shape: tuple, rank: int, gen: torch.Generator, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of `shape`: linear (out, in) or convolution (out, in, kh, kw) -> LoCon."""
    out, inp = shape[0], shape[1]
    if len(shape) == 4:
        down = torch.randn((rank, inp, *shape[2:]), generator=gen) * std
        up = torch.randn((out, rank, 1, 1), generator=gen) * std
    else:
        down = torch.randn((rank, inp), generator=gen) * std
        up = torch.randn((out, rank), generator=gen) * std
    return down, up


def write_kohya_lora(path: Path, unet, text_encoders: dict, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                     sgm_names: bool = False, unet_config: dict | None = None, std: float = 0.3) -> Path:
    """A kohya LoRA over every attention / feed-forward layer and resnet conv1 of `unet`, and the attention and
    MLP layers of each text encoder (`{"lora_te": te}` or `{"lora_te1": te, "lora_te2": te2}`). `sgm_names`:
    U-Net layers under SGM's names (input_blocks_4_1_...), as sd-scripts writes them for SDXL."""
    from safetensors.torch import save_file

    from edgesd.ldm_layout import unet_key

    gen = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(prefix: str, module: str, shape: tuple):
        down, up = _pair(shape, rank, gen, std)
        key = f"{prefix}_{module.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))

    for name, param in unet.named_parameters():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and (module.endswith(_ATTENTION) or module.endswith("resnets.0.conv1")):
            stored = unet_key(name, unet_config).key.removesuffix(".weight") if sgm_names else module
            add("lora_unet", stored, tuple(param.shape))
    for prefix, encoder in text_encoders.items():
        for name, param in encoder.named_parameters():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.endswith(_TEXT):
                add(prefix, "text_model." + module.removeprefix("text_model."), tuple(param.shape))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_peft_lora(folder: Path, pipe, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    """A diffusers / PEFT LoRA (random A and B) on the U-Net's attention and the text encoder(s), written by
    diffusers' save_lora_weights with its adapter metadata (lora_alpha)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet),
              "unet_lora_adapter_metadata": unet_config.to_dict()}
    pipe.unet.delete_adapters("default")
    gen = torch.Generator().manual_seed(seed + 1)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        # PEFT's names for a CLIP text model (this transformers needs a newer peft than PyPI has to add one)
        tensors = {}
        for module, param in encoder.named_parameters():
            module = module.removesuffix(".weight")
            if module.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                key = "text_model." + module.removeprefix("text_model.")
                tensors[f"{key}.lora_A.weight"] = torch.randn((rank, param.shape[1]), generator=gen) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn((param.shape[0], rank), generator=gen) * 0.3
        layers[f"{name}_lora_layers"] = tensors
        layers[f"{name}_lora_adapter_metadata"] = {**unet_config.to_dict(),
                                                   "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    type(pipe).save_lora_weights(folder, **layers, weight_name="lora.safetensors")
    return Path(folder) / "lora.safetensors"
