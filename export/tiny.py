"""Build small Stable Diffusion pipelines with random weights, saved as ordinary diffusers folders.

Used by the tests and the demo; the layout and every class are SD 1.x's, only smaller.
With `reference_config` the components take SD 1.5's real configs (random weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from edgesd.tokenizer import ClipTokenizer, packaged_vocab

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8, sample_size=32, scaling_factor=0.18215,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_act="quick_gelu",
)
# Smaller still, for fixtures committed to the repository (a few MB in all).
MICRO_OVERRIDES = {
    "unet": dict(block_out_channels=(16, 32), cross_attention_dim=8, attention_head_dim=4),
    "vae": dict(block_out_channels=(8, 16)),
    "text": dict(hidden_size=8, intermediate_size=16, num_attention_heads=2),
}
SD_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    prediction_type="epsilon", timestep_spacing="leading",
)


def build_random_sd(out: Path, seed: int = 0, reference_config: Path | None = None,
                    prediction_type: str = "epsilon", size: Literal["tiny", "micro"] = "tiny") -> Path:
    """Write a diffusers StableDiffusionPipeline folder with random weights to `out`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    if reference_config is not None:
        ref = Path(reference_config)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ref / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(ref / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(ref / "text_encoder"))
        scheduler = PNDMScheduler.from_config(json.loads((ref / "scheduler" / "scheduler_config.json").read_text()))
    else:
        micro = MICRO_OVERRIDES if size == "micro" else {"unet": {}, "vae": {}, "text": {}}
        unet = UNet2DConditionModel(**{**TINY_UNET, **micro["unet"]})
        vae = AutoencoderKL(**{**TINY_VAE, **micro["vae"]})
        text = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, **micro["text"]}))
        scheduler = PNDMScheduler.from_config({**SD_SCHEDULER, "prediction_type": prediction_type})
    tok_dir = out / "tokenizer"
    ClipTokenizer.packaged().write_folder(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


# --- the other families, for the family tests: each a diffusers folder its own pipeline class loads -------

TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=8,
)  # 80 = 6 time ids x 8 + the second encoder's 32-wide projection; 64 = 32 + 32 (both encoders' widths)
TINY_SD2 = dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
FamilyKind = Literal["sd2", "turbo", "lcm", "inpaint", "sdxl", "sdxl-turbo", "sdxl-inpaint"]


# Smaller still, for the committed optimum fixtures of the families.
MICRO_FAMILY = {"text": dict(hidden_size=8, intermediate_size=16, num_attention_heads=2),
                "unet": dict(block_out_channels=(16, 32), cross_attention_dim=8, attention_head_dim=4),
                "sdxl_unet": dict(block_out_channels=(16, 32), cross_attention_dim=16,
                                  projection_class_embeddings_input_dim=56),  # 6 x 8 + 8
                "vae": dict(block_out_channels=(8, 16)), "projection_dim": 8}


def build_random_family(out: Path, kind: FamilyKind, seed: int = 0, size: Literal["tiny", "micro"] = "tiny",
                        second_encoder_width: int | None = None) -> Path:
    """Write a tiny diffusers folder of another family with random weights: SD 2.x (v-prediction, OpenCLIP-style
    gelu text encoder, "!" as pad token), SD-Turbo (trailing Euler), LCM (guidance embedding), 9-channel
    inpainting, SDXL (two text encoders), SDXL-Turbo or SDXL inpainting."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    sdxl = kind.startswith("sdxl")

    def tokenizer(folder: str, pad: str):
        vocab, merges = packaged_vocab()
        ClipTokenizer(vocab, merges, pad_token=pad).write_folder(out / folder)
        return CLIPTokenizer.from_pretrained(out / folder)

    micro = MICRO_FAMILY if size == "micro" else {"text": {}, "unet": {}, "sdxl_unet": {}, "vae": {},
                                                  "projection_dim": 32}
    text_config = dict(TINY_TEXT, hidden_act="quick_gelu" if kind in ("lcm", "inpaint") else "gelu", **micro["text"])
    vae = AutoencoderKL(**{**TINY_VAE, **micro["vae"],
                           **({"scaling_factor": 0.13025, "force_upcast": True} if sdxl else {})})
    parts = dict(vae=vae)
    if sdxl:
        unet = {**TINY_SDXL_UNET, **micro["sdxl_unet"], **({"in_channels": 9} if kind == "sdxl-inpaint" else {})}
        second = dict(text_config)
        if second_encoder_width is not None:
            second.update(hidden_size=second_encoder_width, intermediate_size=2 * second_encoder_width)
            unet["cross_attention_dim"] = text_config["hidden_size"] + second_encoder_width
        parts["unet"] = UNet2DConditionModel(**unet)
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**second, projection_dim=micro["projection_dim"])).eval()
        parts["tokenizer"], parts["tokenizer_2"] = tokenizer("tokenizer", "<|endoftext|>"), tokenizer("tokenizer_2", "!")
    else:
        unet = {**TINY_UNET, **(TINY_SD2 if kind in ("sd2", "turbo") else {}), **micro["unet"]}
        if kind == "lcm":
            unet["time_cond_proj_dim"] = 32
        if kind == "inpaint":
            unet["in_channels"] = 9
        parts["unet"] = UNet2DConditionModel(**unet)
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
        parts["tokenizer"] = tokenizer("tokenizer", "!" if kind in ("sd2", "turbo") else "<|endoftext|>")
    base = {k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"}
    scheduler = {
        "sd2": ("DDIMScheduler", {"prediction_type": "v_prediction"}),
        "turbo": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
        "sdxl-turbo": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
        "lcm": ("LCMScheduler", {"steps_offset": 0}),
        "inpaint": ("DDIMScheduler", {}),
        "sdxl": ("EulerDiscreteScheduler", {}),
        "sdxl-inpaint": ("EulerDiscreteScheduler", {}),
    }[kind]
    parts["scheduler"] = getattr(diffusers, scheduler[0]).from_config({**base, **scheduler[1]})
    pipeline = {"sd2": "StableDiffusionPipeline", "turbo": "StableDiffusionPipeline",
                "lcm": "LatentConsistencyModelPipeline", "inpaint": "StableDiffusionInpaintPipeline",
                "sdxl": "StableDiffusionXLPipeline", "sdxl-turbo": "StableDiffusionXLPipeline",
                "sdxl-inpaint": "StableDiffusionXLInpaintPipeline"}[kind]
    if sdxl:
        pipe = getattr(diffusers, pipeline)(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = getattr(diffusers, pipeline)(**parts, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    for module in ("unet", "text_encoder", "text_encoder_2"):
        if module in parts:
            parts[module].eval()
    pipe.save_pretrained(out)
    return out
