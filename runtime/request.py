"""What to generate: one frozen, validated request, and what came out of it."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import EdgesdError
from .graphs import UNET_SHALLOW, UNET_TOME
from .noise import NOISE_GENERATORS, NoiseGenerator
from .tiling import MIN_TILE_SIZE, TILING_MODES, TilingMode

if TYPE_CHECKING:
    from .families import ModelFamily
    from .model import ModelFolder

MAX_STEPS = 1000
DEFAULT_MAX_PIXELS = 1 << 24  # 16,777,216: one 4096 x 4096 picture, 16 of 1024 x 1024, 64 of 512 x 512


def parse_size(text, what: str = "size") -> tuple[int, int]:
    """'512x768' -> (512, 768) (the OpenAI API's, the CLI's and batch rows' form); anything else raises."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text) if isinstance(text, str) else None
    if match is None:
        raise EdgesdError(f"{what} {text!r} is not WIDTHxHEIGHT", "e.g. 512x768")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class GenerationRequest:
    """Every field of one generation, checked against the model when built (`GenerationRequest.build`).

    The names follow diffusers' pipelines; `prompts` etc. are per prompt, and `batch` images are made
    (prompts x images_per_prompt).
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None  # None: not given ("" for SD, zeros for SDXL that force them)
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    images_per_prompt: int = 1
    guidance_rescale: float = 0.0
    # the share of the steps that get classifier-free guidance (the first ceil(cutoff x steps)); the rest run
    # the conditional branch alone, at half the U-Net batch: faster, and a different picture
    guidance_cutoff: float = 1.0
    # DeepCache (Ma et al. 2023): the whole U-Net every N-th evaluation, the shallow path on its kept deep
    # features between (the model needs `edgesd deepcache`); 1: every evaluation runs the whole U-Net
    deepcache_interval: int = 1
    # token merging (ToMe for SD, Bolya & Hoffman 2023): the share of the full-resolution tokens merged away in
    # each self-attention (the model needs `edgesd tome`); 0: no merging
    token_merging: float = 0.0
    scheduler: str | dict | None = None  # our name, A1111's, a diffusers config dict, or None: the model's own
    noise_generator: NoiseGenerator = "numpy"
    eta: float | None = None
    # SDXL's second text encoder (None: the same as prompts / negative_prompts)
    prompts_2: tuple[str, ...] | None = None
    negative_prompts_2: tuple[str, ...] | None = None
    # SDXL's micro-conditioning, (height, width) and (top, left) as diffusers takes them
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    # img2img / inpainting
    image: Any = field(default=None, compare=False)  # a PIL image or (H, W, 3) uint8 array
    mask_image: Any = field(default=None, compare=False)  # white = repaint; PIL or (H, W) / (H, W, C) uint8
    strength: float | None = None  # None: 0.8 for img2img, 1.0 for inpainting (diffusers' defaults)
    latents: np.ndarray | None = field(default=None, compare=False)  # initial noise (N, C, H/f, W/f)
    # pictures x width x height of one call at most: checked before anything is allocated (raise it for more)
    max_pixels: int = DEFAULT_MAX_PIXELS
    vae_tiling: TilingMode = "auto"  # decode/encode in overlapping tiles: auto (large pictures), on, off
    vae_tile_size: int | None = None  # a tile's side in pixels (None: the VAE's sample size, as diffusers)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    @property
    def denoising_strength(self) -> float:
        if self.strength is not None:
            return self.strength
        return 1.0 if self.mask_image is not None else 0.8

    def time_ids(self) -> list[int]:
        """SDXL's add_time_ids: original size + crop top-left + target size, each (height, width)."""
        size = (self.height, self.width)
        return [*(self.original_size or size), *self.crops_coords_top_left, *(self.target_size or size)]

    @classmethod
    def build(cls, folder: "ModelFolder", family: "ModelFamily", prompt, negative_prompt=None,
              num_inference_steps=None, guidance_scale=None, width=None, height=None, seed=None,
              num_images_per_prompt=1, prompt_2=None, negative_prompt_2=None, image=None, mask_image=None,
              **rest) -> "GenerationRequest":
        """A request from diffusers' argument names, with the model's defaults filled in; bad input raises."""
        prompts = _texts("prompt", prompt)
        if prompts is None:
            raise EdgesdError("prompt must be a string or a non-empty list of strings")
        negatives = _matching("negative_prompt", negative_prompt, prompts)
        if (prompt_2 is not None or negative_prompt_2 is not None) and len(family.text_encoders) < 2:
            raise EdgesdError(f"prompt_2 / negative_prompt_2 need a model with a second text encoder; "
                              f"'{folder.root.name}' is {family.title}", "drop --prompt-2 / --negative-2")
        if mask_image is not None and image is None:
            raise EdgesdError("mask_image needs image (the picture to repaint)", "pass --image with --mask")
        if mask_image is not None and rest.get("strength") is None:
            rest["strength"] = family.inpaint_strength
        defaults = folder.defaults
        steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = defaults.guidance_scale if guidance_scale is None else guidance_scale
        if image is not None and (width is None or height is None):
            native = _picture_size(image, "image")
            width, height = native[0] if width is None else width, native[1] if height is None else height
        size = folder.constants.default_image_size
        req = cls(prompts=prompts, negative_prompts=negatives, steps=steps, guidance_scale=guidance,
                  width=size if width is None else width, height=size if height is None else height,
                  seed=secrets.randbelow(2**32) if seed is None else seed,
                  images_per_prompt=num_images_per_prompt,
                  prompts_2=_matching("prompt_2", prompt_2, prompts),
                  negative_prompts_2=_matching("negative_prompt_2", negative_prompt_2, prompts),
                  image=image, mask_image=mask_image, **rest)
        req.check(folder, family)
        return req

    def check(self, folder: "ModelFolder", family: "ModelFamily") -> None:
        """Raise EdgesdError naming the first field that does not fit the model."""
        if not isinstance(self.steps, (int, np.integer)) or isinstance(self.steps, bool) \
                or not 1 <= self.steps <= MAX_STEPS:
            raise EdgesdError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}", "use e.g. 20")
        for name in ("eta", "strength", "guidance_rescale", "guidance_cutoff"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not np.isfinite(value)):
                raise EdgesdError(f"{name} must be a number, got {value!r}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise EdgesdError(f"eta must be between 0 and 1, got {self.eta}", "use 0 for deterministic DDIM")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise EdgesdError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}",
                              "leave it out for a random seed")
        if self.scheduler is not None and not isinstance(self.scheduler, (str, dict)):
            raise EdgesdError(f"scheduler must be a name or a diffusers config dict, got {type(self.scheduler).__name__}",
                              "e.g. scheduler=\"euler\"")
        if self.latents is not None and (not isinstance(self.latents, np.ndarray)
                                         or not np.issubdtype(self.latents.dtype, np.floating)):
            raise EdgesdError(f"latents must be a floating-point NumPy array, got {type(self.latents).__name__}",
                              "pass standard-normal noise of shape (N, C, H/f, W/f)")
        if not _is_number(self.guidance_scale) or self.guidance_scale < 0 or not np.isfinite(self.guidance_scale):
            raise EdgesdError(f"guidance scale must be >= 0, got {self.guidance_scale}",
                              "use e.g. 7.5, or 1 for no guidance")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise EdgesdError(f"guidance_rescale must be between 0 and 1, got {self.guidance_rescale}",
                              "use e.g. 0.7")
        if not 0.0 < self.guidance_cutoff <= 1.0:
            raise EdgesdError(f"guidance_cutoff must be in (0, 1], got {self.guidance_cutoff}",
                              "use e.g. 0.5 to guide the first half of the steps, or 1 to guide every step")
        if not isinstance(self.deepcache_interval, (int, np.integer)) or isinstance(self.deepcache_interval, bool) \
                or self.deepcache_interval < 1:
            raise EdgesdError(f"deepcache_interval must be a whole number >= 1, got {self.deepcache_interval!r}",
                              "use e.g. 2 or 3, or 1 to run the whole U-Net at every step")
        if self.deepcache_interval > 1 and not folder.has(UNET_SHALLOW):
            raise EdgesdError(f"'{folder.root.name}' has no DeepCache graphs (its {UNET_SHALLOW}/)",
                              f"add them once with `edgesd deepcache MODEL` (needs the export extra; the embedded "
                              "model: to a copy of it), or leave deepcache_interval at 1")
        if not _is_number(self.token_merging) or not 0.0 <= self.token_merging <= MAX_TOKEN_MERGING:
            raise EdgesdError(f"token_merging must be a share in [0, {MAX_TOKEN_MERGING}], got {self.token_merging!r}",
                              "use e.g. 0.5 (half the full-resolution tokens merged), or 0 for none")
        if self.token_merging > 0 and not folder.has(UNET_TOME):
            raise EdgesdError(f"'{folder.root.name}' has no token-merging U-Net "
                              f"({folder.graph_path(UNET_TOME).relative_to(folder.root).as_posix()})",
                              "add it once with `edgesd tome MODEL` (needs the export extra; the embedded model: "
                              "to a copy of it), or leave token_merging at 0")
        if self.token_merging > 0 and self.deepcache_interval > 1:
            raise EdgesdError("token merging and DeepCache together are not supported yet",
                              "use one of them: token_merging 0 or deepcache_interval 1")
        if not isinstance(self.images_per_prompt, (int, np.integer)) or isinstance(self.images_per_prompt, bool) \
                or self.images_per_prompt < 1:
            raise EdgesdError(f"images per prompt must be >= 1, got {self.images_per_prompt}")
        if self.vae_tiling not in TILING_MODES:
            raise EdgesdError(f"unknown vae_tiling {self.vae_tiling!r}", f"use one of: {', '.join(TILING_MODES)}")
        if self.vae_tile_size is not None and (isinstance(self.vae_tile_size, bool) or not isinstance(
                self.vae_tile_size, (int, np.integer)) or self.vae_tile_size < MIN_TILE_SIZE or self.vae_tile_size % 64):
            raise EdgesdError(f"vae_tile_size must be a multiple of 64 pixels, at least {MIN_TILE_SIZE}, got "
                              f"{self.vae_tile_size!r}", "e.g. 256, or leave it unset for the VAE's sample size")
        if self.noise_generator not in NOISE_GENERATORS:
            raise EdgesdError(f"unknown noise generator {self.noise_generator!r}",
                              f"use one of: {', '.join(NOISE_GENERATORS)}")
        if not isinstance(self.max_pixels, (int, np.integer)) or self.max_pixels < 1:
            raise EdgesdError(f"max_pixels must be a positive whole number, got {self.max_pixels!r}")
        if isinstance(self.width, (int, np.integer)) and isinstance(self.height, (int, np.integer)) \
                and isinstance(self.images_per_prompt, (int, np.integer)) \
                and self.batch * self.width * self.height > self.max_pixels:
            raise EdgesdError(f"{self.batch} picture(s) of {self.width}x{self.height} are "
                              f"{self.batch * self.width * self.height:,} pixels, above the limit of "
                              f"{self.max_pixels:,}", "make fewer or smaller pictures, or raise the limit "
                              "(--max-pixels / max_pixels=) if the machine has the memory")
        if self.latents is not None and np.issubdtype(np.asarray(self.latents).dtype, np.floating) \
                and not np.isfinite(self.latents).all():
            raise EdgesdError("latents hold NaN or infinite values", "pass finite standard-normal noise")
        multiple, size = folder.constants.image_size_multiple, folder.constants.default_image_size
        for name, value in (("width", self.width), ("height", self.height)):
            if not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
                raise EdgesdError(f"{name} {value!r} is not a positive multiple of {multiple}",
                                  f"this model needs sizes in steps of {multiple}, e.g. {size}")
        if self.token_merging > 0:
            _check_merged_grid(folder, self.width, self.height)
        if self.image is not None:
            _picture_size(self.image, "image")
            if not 0.0 < self.denoising_strength <= 1.0:
                raise EdgesdError(f"strength must be in (0, 1], got {self.strength}", "use e.g. 0.75")
        if self.mask_image is not None:
            mask_size = _picture_size(self.mask_image, "mask_image", mask=True)
            image_size = _picture_size(self.image, "image")
            if mask_size != image_size:
                raise EdgesdError(f"mask_image is {mask_size[0]}x{mask_size[1]} but image is "
                                  f"{image_size[0]}x{image_size[1]}", "give a mask of the picture's size")
        elif family.inpaint_unet:
            raise EdgesdError(f"'{folder.root.name}' is an inpainting model: it needs image and mask_image",
                              "pass --image and --mask (white = repaint)")

    def parameters(self, sampler: str, model: str, backend: dict) -> dict:
        """What the result and the PNG's text chunks record (the A1111 'parameters' fields and ours)."""
        def one(texts):  # one text when all are the same (or none was given)
            return "" if not texts else texts[0] if len(set(texts)) == 1 else list(texts)

        params = {"prompt": self.prompts[0] if len(self.prompts) == 1 else list(self.prompts),
                  "negative_prompt": one(self.negative_prompts),
                  "steps": self.steps, "scheduler": sampler, "guidance_scale": self.guidance_scale}
        if self.guidance_rescale:
            params["guidance_rescale"] = self.guidance_rescale
        if self.guidance_cutoff != 1.0:
            params["guidance_cutoff"] = self.guidance_cutoff
        if self.deepcache_interval != 1:
            params["deepcache_interval"] = int(self.deepcache_interval)
        if self.token_merging:
            params["token_merging"] = float(self.token_merging)
        params.update({"seed": self.seed, "width": self.width, "height": self.height})
        if self.noise_generator != "numpy":
            params["noise_generator"] = self.noise_generator
        if self.vae_tiling != "auto":
            params["vae_tiling"] = self.vae_tiling
        if self.vae_tile_size is not None:
            params["vae_tile_size"] = self.vae_tile_size
        for name, key in (("prompts_2", "prompt_2"), ("negative_prompts_2", "negative_prompt_2")):
            if getattr(self, name) is not None:
                params[key] = one(getattr(self, name))
        params.update({"model": model, **backend})
        if self.image is not None:
            params["strength"] = self.denoising_strength
        if self.mask_image is not None:
            params["inpainting"] = True
        return params


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    parameters: dict = field(default_factory=dict)
    latents: np.ndarray | None = None  # final denoised latents (N, C, H/f, W/f), before the VAE
    timings: dict = field(default_factory=dict)  # seconds per graph, U-Net calls, total
    warnings: list[str] = field(default_factory=list)  # e.g. prompts cut to the text encoder's length
    request: GenerationRequest | None = None


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _texts(name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    texts = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not texts or not all(isinstance(t, str) for t in texts):
        raise EdgesdError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8 (e.g. from a shell)
            raise EdgesdError(f"{name} holds characters that are not valid Unicode (at position {e.start})",
                              "pass the text as UTF-8") from None
    return texts


def _matching(name: str, value, prompts: tuple[str, ...]) -> tuple[str, ...] | None:
    """One text per prompt (a single one is repeated), or None when not given."""
    texts = _texts(name, value)
    if texts is None:
        return None
    if len(texts) == 1:
        return texts * len(prompts)
    if len(texts) != len(prompts):
        label = {"negative_prompt": "negative prompts", "prompt_2": "second prompts",
                 "negative_prompt_2": "second negative prompts"}[name]
        raise EdgesdError(f"{len(texts)} {label} for {len(prompts)} prompts",
                          f"give one {name} per prompt, or a single one")
    return texts


MAX_TOKEN_MERGING = 0.75  # ToMe for SD merges src tokens (3 of each 2x2 cell) into dst tokens: at most 3/4


def _check_merged_grid(folder: ModelFolder, width: int, height: int) -> None:
    """Token merging pairs the tokens of 2x2 cells: each merged level's grid must have even sides."""
    levels = int(((folder.manifest or {}).get("graphs", {}).get(UNET_TOME) or {}).get("merged_levels", 1))
    factor = folder.constants.vae_scale_factor * 2 ** levels  # the latent side halves once per level below the first
    for name, value in (("width", width), ("height", height)):
        if value % factor:
            raise EdgesdError(f"token merging needs the {name} in steps of {factor} (even token grids at the "
                              f"{levels} merged level(s)), got {value}",
                              f"pick a {name} that is a multiple of {factor}, or leave token_merging at 0")


def _picture_size(picture, name: str, mask: bool = False) -> tuple[int, int]:
    """(width, height) of a PIL image or uint8 array; anything else is an error naming `name`."""
    if isinstance(picture, Image.Image):
        return picture.size
    if not isinstance(picture, np.ndarray):
        raise EdgesdError(f"{name} must be a PIL image or an (H, W, 3) uint8 array, got {type(picture).__name__}")
    ok_ndim = picture.ndim in ((2, 3) if mask else (3,))
    if not ok_ndim or (picture.ndim == 3 and picture.shape[2] not in ((1, 3, 4) if mask else (3, 4))) \
            or picture.dtype != np.uint8:
        want = "an (H, W) or (H, W, C) uint8 array" if mask else "an (H, W, 3) uint8 array"
        raise EdgesdError(f"{name} array has shape {picture.shape} and dtype {picture.dtype}",
                          f"pass {want} or a PIL image")
    return picture.shape[1], picture.shape[0]


