"""Model families: what differs between SD 1.x/2.x, LCM, SDXL and inpainting models, in one table.

A family owns its components (graph descriptions, read by the exporter, the runtime and the tests), its
tokenizers and text encoders, and the extra U-Net inputs it computes for a request (`conditioning`). It is
chosen from a model folder's `model_index.json` and U-Net config, for diffusers folders and exported ones
alike (both keep the U-Net's `config.json`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import EdgesdError
from .graphs import (UNET_SHALLOW, UNET_TOME, VAE_DECODER, VAE_ENCODER, GraphSpec, text_encoder_spec, unet_shallow_spec,
                     unet_spec, unet_tome_spec)

if TYPE_CHECKING:
    from .request import GenerationRequest
    from .tokenizer import ClipTokenizer

# run(component, feeds) -> outputs: how a family runs its text encoders (the pipeline's run context)
RunFn = Callable[[str, dict], dict]


@dataclass(frozen=True)
class TextEncoder:
    component: str  # graph folder: text_encoder, text_encoder_2
    tokenizer: str  # tokenizer folder: tokenizer, tokenizer_2
    pooled: str  # its pooled output: pooler_output (CLIPTextModel) or text_embeds (CLIPTextModelWithProjection)
    penultimate: bool = False  # condition on the hidden states before the last layer (SDXL), not the last


@dataclass(frozen=True)
class Conditioning:
    """The U-Net inputs besides sample and timestep: conditional and unconditional (None without guidance)."""

    cond: dict[str, np.ndarray]  # name -> (B, ...)
    uncond: dict[str, np.ndarray] | None = None

    def stacked(self) -> dict[str, np.ndarray]:
        """[uncond; cond] on the batch axis for one guided U-Net call, (2B, ...); else the conditional ones."""
        if self.uncond is None:
            return self.cond
        return {k: np.concatenate([self.uncond[k], v]) for k, v in self.cond.items()}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    title: str
    pipelines: tuple[str, ...]  # diffusers' and optimum's pipeline class names for this family
    text_encoders: tuple[TextEncoder, ...]
    micro_conditioning: bool = False  # SDXL: pooled text embeds and size/crop time ids (Podell et al. 2023)
    inpaint_unet: bool = False  # 9-channel U-Net: latents + mask + masked-image latents
    classifier_free: bool = True  # False (LCM): guidance goes in through the w embedding, no uncond batch
    default_steps: int = 20
    default_guidance: float = 7.5
    inpaint_strength: float = 1.0  # the strength a mask gets when none is given (diffusers' default)

    @property
    def text_components(self) -> tuple[str, ...]:
        return tuple(e.component for e in self.text_encoders)

    def projected(self, component: str) -> bool:
        """Whether this text encoder is a CLIPTextModelWithProjection (its pooled output is text_embeds)."""
        return any(e.component == component and e.pooled == "text_embeds" for e in self.text_encoders)

    def unet_inputs(self, unet_config: dict) -> tuple[str, ...]:
        """The U-Net's extra inputs, in graph order."""
        extra = ("text_embeds", "time_ids") if self.micro_conditioning else ()
        if unet_config.get("time_cond_proj_dim"):
            extra += ("timestep_cond",)
        return extra

    def graph_specs(self, configs: dict[str, dict]) -> dict[str, GraphSpec]:
        """Every graph of this family, by component, from the component configs (`unet`, `text_encoder`, ...)."""
        specs = {}
        for enc in self.text_encoders:
            layers = int(configs.get(enc.component, {}).get("num_hidden_layers", 1))
            specs[enc.component] = text_encoder_spec(enc.component, enc.pooled,
                                                     layers - 1 if enc.penultimate else None)
        specs["unet"] = unet_spec(self.unet_inputs(configs.get("unet", {})))
        specs[UNET_SHALLOW] = unet_shallow_spec(specs["unet"])  # DeepCache's, where the folder has it
        specs[UNET_TOME] = unet_tome_spec(specs["unet"])  # token merging's, where the folder has it
        specs["vae_decoder"] = VAE_DECODER
        specs["vae_encoder"] = VAE_ENCODER
        return specs

    def sample_sizes(self, component: str, configs: dict[str, dict], latent: int) -> dict[str, int]:
        """Sizes of the symbolic dims of `component`'s sample inputs (GraphSpec.sample_inputs): what export
        tracing, parity checks and tests feed, at `latent` latent pixels a side."""
        unet = configs.get("unet", {})
        if component in self.text_components:
            text = configs.get(component, {})
            return {"batch": 2, "sequence": int(text.get("max_position_embeddings", 77)),
                    "vocab": int(text.get("vocab_size", 49408)), "bos": int(text.get("bos_token_id", 49406)),
                    "eos": int(text.get("eos_token_id", 49407))}
        if component == "unet":
            sequence = int(configs.get("text_encoder", {}).get("max_position_embeddings", 77))
            sizes = {"batch": 2, "channels": int(unet.get("in_channels", 4)), "height": latent, "width": latent,
                     "sequence": sequence, "hidden": int(unet.get("cross_attention_dim", 768))}
            if self.micro_conditioning:  # pooled = what the add embedding takes beyond the 6 time ids
                sizes["pooled"] = (int(unet["projection_class_embeddings_input_dim"])
                                   - 6 * int(unet["addition_time_embed_dim"]))
            if unet.get("time_cond_proj_dim"):
                sizes["guidance_embedding"] = int(unet["time_cond_proj_dim"])
            return sizes
        vae = configs.get("vae", {})
        if component == "vae_decoder":
            return {"batch": 1, "channels": int(vae.get("latent_channels", 4)), "latent_height": latent,
                    "latent_width": latent}
        factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return {"batch": 1, "height": latent * factor, "width": latent * factor}

    # --- conditioning ----------------------------------------------------------------------------------

    def guided(self, request: "GenerationRequest") -> bool:
        return self.classifier_free and request.guidance_scale > 1.0

    def encode_text(self, first: list[str], second: list[str], tokenizers: dict[str, "ClipTokenizer"],
                    specs: dict[str, GraphSpec], run: RunFn) -> dict[str, np.ndarray]:
        """Prompts (and the second encoder's) -> encoder_hidden_states (P, S, D1 [+ D2]) and, for SDXL,
        text_embeds (P, D2): the last encoder's pooled projection."""
        hidden, pooled = [], None
        for enc, texts in zip(self.text_encoders, (first, second)):
            out = run(enc.component, {"input_ids": tokenizers[enc.tokenizer](texts)})
            hidden.append(out[specs[enc.component].output_names[0]])  # hidden_states.N (penultimate) or last
            pooled = out.get(enc.pooled, pooled)
        embeds = {"encoder_hidden_states": np.concatenate(hidden, axis=-1)}
        if self.micro_conditioning:
            embeds["text_embeds"] = pooled
        return embeds

    def conditioning(self, request: "GenerationRequest", configs: dict[str, dict],
                     tokenizers: dict[str, "ClipTokenizer"], run: RunFn) -> Conditioning:
        """Text (and SDXL's micro-conditioning, LCM's w embedding) for every image of the request; `configs`
        are the model folder's (model_index, unet, text encoders)."""
        repeat = request.images_per_prompt
        specs, unet_config = self.graph_specs(configs), configs.get("unet", {})
        force_zeros = bool(configs.get("model_index", {}).get("force_zeros_for_empty_prompt"))

        def per_image(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: np.repeat(v, repeat, 0) for k, v in arrays.items()}

        def encode(first: list[str], second: list[str]) -> dict[str, np.ndarray]:
            return self.encode_text(first, second, tokenizers, specs, run)

        prompts = list(request.prompts)
        prompts_2 = list(request.prompts_2 or prompts)
        uncond = None
        if self.guided(request) and not (force_zeros and request.negative_prompts is None):
            negatives = list(request.negative_prompts or [""] * len(prompts))
            negatives_2 = list(request.negative_prompts_2 or negatives)
            both = encode(negatives + prompts, negatives_2 + prompts_2)  # one call per encoder: [uncond; cond]
            uncond = per_image({k: v[: len(prompts)] for k, v in both.items()})
            cond = per_image({k: v[len(prompts):] for k, v in both.items()})
        else:
            cond = per_image(encode(prompts, prompts_2))
            if self.guided(request):  # SDXL's force_zeros_for_empty_prompt: no negative given, zeros
                uncond = {k: np.zeros_like(v) for k, v in cond.items()}
        batch = request.batch
        extra = {}
        if self.micro_conditioning:
            extra["time_ids"] = np.tile(np.array(request.time_ids(), np.float32), (batch, 1))  # (B, 6)
        if "timestep_cond" in self.unet_inputs(unet_config):
            w = np.full((batch,), request.guidance_scale - 1.0, np.float32)
            extra["timestep_cond"] = guidance_embedding(w, int(unet_config["time_cond_proj_dim"]))
        cond = {**cond, **extra}
        if uncond is not None:
            uncond = {**uncond, **extra}
        return Conditioning(cond, uncond)


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of the guidance scale w (B,) -> (B, dim), as the LCM U-Net's timestep_cond
    (Luo et al. 2023, arXiv:2310.04378, Sec. 4.2; the transformer's position embedding of 1000 w)."""
    w = w.astype(np.float32) * np.float32(1000.0)
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -np.float32(np.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]  # (B, dim / 2)
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


_CLIP = TextEncoder("text_encoder", "tokenizer", "pooler_output")
_SDXL_ENCODERS = (TextEncoder("text_encoder", "tokenizer", "pooler_output", penultimate=True),
                  TextEncoder("text_encoder_2", "tokenizer_2", "text_embeds", penultimate=True))

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily("sd", "SD 1.x / 2.x (and SD-Turbo)",
                ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "ORTStableDiffusionPipeline",
                 "OVStableDiffusionPipeline"), (_CLIP,)),
    ModelFamily("sd-inpaint", "SD 1.x / 2.x inpainting (9-channel U-Net)",
                ("StableDiffusionInpaintPipeline", "ORTStableDiffusionInpaintPipeline",
                 "OVStableDiffusionInpaintPipeline"), (_CLIP,), inpaint_unet=True),
    ModelFamily("lcm", "Latent consistency (LCM)",
                ("LatentConsistencyModelPipeline", "ORTLatentConsistencyModelPipeline",
                 "OVLatentConsistencyModelPipeline"), (_CLIP,), classifier_free=False, default_steps=4,
                default_guidance=8.5),
    ModelFamily("sdxl", "SDXL (and SDXL-Turbo)",
                ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "ORTStableDiffusionXLPipeline",
                 "OVStableDiffusionXLPipeline"), _SDXL_ENCODERS, micro_conditioning=True, default_guidance=5.0),
    ModelFamily("sdxl-inpaint", "SDXL inpainting (9-channel U-Net)",
                ("StableDiffusionXLInpaintPipeline", "ORTStableDiffusionXLInpaintPipeline",
                 "OVStableDiffusionXLInpaintPipeline"), _SDXL_ENCODERS, micro_conditioning=True, inpaint_unet=True,
                default_guidance=7.5, inpaint_strength=0.9999),
)}

# Pipelines users may hold that edgesd does not run, with what they are.
UNSUPPORTED = {
    "StableDiffusion3Pipeline": "SD3 (a transformer, not a U-Net)",
    "FluxPipeline": "Flux (a transformer, not a U-Net)",
    "PixArtAlphaPipeline": "PixArt (a transformer)",
    "StableDiffusionUpscalePipeline": "the SD x4 upscaler",
    "StableDiffusionLatentUpscalePipeline": "the SD latent upscaler",
    "StableUnCLIPPipeline": "Stable unCLIP",
    "StableUnCLIPImg2ImgPipeline": "Stable unCLIP",
    "StableDiffusionXLRefinerPipeline": "the SDXL refiner",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "StableCascadePriorPipeline": "Stable Cascade",
}


def detect_family(model_index: dict, unet_config: dict, where: str) -> ModelFamily:
    """The family of a model from its pipeline class and U-Net config; an unsupported one is an error."""
    class_name = str(model_index.get("_class_name", ""))
    if class_name in UNSUPPORTED or "transformer" in model_index:
        what = UNSUPPORTED.get(class_name, f"a transformer model ({class_name})")
        raise EdgesdError(f"'{where}' is {what}, which edgesd does not run",
                          "edgesd runs SD 1.x/2.x, SD-Turbo, SDXL, LCM and inpainting models")
    embed = unet_config.get("addition_embed_type")
    if embed not in (None, "text_time") or unet_config.get("class_embed_type") is not None \
            or unet_config.get("num_class_embeds") is not None:
        raise EdgesdError(f"'{where}': its U-Net takes conditioning edgesd does not compute "
                          f"(addition_embed_type={embed!r}, class_embed_type={unet_config.get('class_embed_type')!r})",
                          "edgesd runs SD 1.x/2.x, SD-Turbo, SDXL, LCM and inpainting models")
    channels = int(unet_config.get("in_channels", 4))
    out_channels = int(unet_config.get("out_channels", channels))
    inpaint = channels == 2 * out_channels + 1
    if channels not in (out_channels, 2 * out_channels + 1):
        raise EdgesdError(f"'{where}': a U-Net with {channels} input channels is not text-to-image or inpainting",
                          "edgesd runs SD 1.x/2.x, SD-Turbo, SDXL, LCM and inpainting models")
    if embed == "text_time":
        name = "sdxl-inpaint" if inpaint else "sdxl"
    elif inpaint:
        name = "sd-inpaint"
    elif class_name.endswith("LatentConsistencyModelPipeline") or (
            unet_config.get("time_cond_proj_dim") and "StableDiffusion" not in class_name):
        name = "lcm"
    else:
        name = "sd"
    return FAMILIES[name]
