"""Text-to-image with exported graphs; everything but the networks runs in NumPy."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import sampling
from .backends import Graph, RuntimeOptions, load_graph
from .denoiser import Denoiser
from .errors import Cancelled, EdgesdError
from .graphs import GRAPHS, REQUIRED_FOR_TEXT_TO_IMAGE
from .images import from_pil, to_pil
from .model import ModelFolder
from .models_path import default_model_path
from .noise import NoiseGenerator, noise_source
from .schedulers import SchedulerConfig, alpha_schedule, alphas_cumprod, resolve_scheduler, sigma_schedule
from .tokenizer import ClipTokenizer

# callback(step, total) after each U-Net evaluation (PLMS makes steps + 1); returning False cancels.
ProgressCallback = Callable[[int, int], "bool | None"]
MAX_STEPS = 1000


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    parameters: dict = field(default_factory=dict)
    latents: np.ndarray | None = None  # final denoised latents (N, C, H/f, W/f), before the VAE
    timings: dict = field(default_factory=dict)  # seconds per graph, U-Net calls, total
    warnings: list[str] = field(default_factory=list)  # e.g. prompts cut to the text encoder's length


@dataclass(frozen=True)
class _Request:
    prompts: list[str]
    negative_prompts: list[str]
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    images_per_prompt: int

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt


class Pipeline:
    """A loaded model: `Pipeline.load(path)(prompt, ...)` -> GenerationResult."""

    def __init__(self, folder: ModelFolder, graphs: dict[str, Graph], tokenizer: ClipTokenizer,
                 options: RuntimeOptions):
        self.folder = folder
        self.graphs = graphs
        self.tokenizer = tokenizer
        self.options = options  # backend resolved: "onnxruntime" or "openvino"
        self._seconds: dict[str, float] = {}
        self._calls: dict[str, int] = {}

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph, adding its wall time to the current generation's timings."""
        start = time.perf_counter()
        out = self.graph(name).run(feeds)
        self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start
        self._calls[name] = self._calls.get(name, 0) + 1
        return out

    @classmethod
    def load(cls, path: str | Path | None = None, options: RuntimeOptions | None = None,
             **option_values) -> "Pipeline":
        """Load a model folder (default: the embedded model).

        `options` (or its fields as keywords: `provider="cpu"`, `threads=2`, `backend="openvino"`, ...) choose
        the backend and tune it; see RuntimeOptions.
        """
        try:
            options = replace(options or RuntimeOptions(), **option_values)
        except TypeError as e:
            raise EdgesdError(f"Pipeline.load: {e}", "see edgesd.RuntimeOptions for the options") from None
        folder = ModelFolder.open(default_model_path() if path is None else path)
        options = options.for_backend(resolve_backend(folder, options.backend))
        tokenizer = ClipTokenizer.from_folder(folder.root / "tokenizer")
        pipe = cls(folder, {}, tokenizer, options)
        for name in REQUIRED_FOR_TEXT_TO_IMAGE:
            pipe.graph(name)
        return pipe

    def graph(self, name: str) -> Graph:
        """The loaded graph of component `name`, loading it on first use (the VAE encoder only img2img needs)."""
        if name not in self.graphs:
            if not self.folder.has(name):
                raise EdgesdError(f"model '{self.folder.root}' has no {name}",
                                  "re-export the model" + (" without --no-vae-encoder" if name == "vae_encoder" else ""))
            self.graphs[name] = load_graph(self.folder.graph_path(name), GRAPHS[name], self.options)
        return self.graphs[name]

    @property
    def constants(self):
        return self.folder.constants

    @property
    def defaults(self):
        """The model's default steps and guidance scale (GenerationDefaults)."""
        return self.folder.defaults

    def _compile_seconds(self) -> float:
        return sum(getattr(g, "compile_seconds", 0.0) for g in self.graphs.values())

    def _backend_parameters(self) -> dict:
        """What ran the graphs, for the image's parameters."""
        if self.options.backend == "openvino":
            return {"backend": "openvino", "device": self.options.device}
        return {"provider": self.options.provider}

    # --- the stages -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> text encoder hidden states (N, S, D)."""
        ids = self.tokenizer(prompts)  # (N, 77)
        return self._run("text_encoder", {"input_ids": ids})["last_hidden_state"]

    def unet(self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
        return self._run("unet", feeds)["out_sample"]

    def encode_image(self, image: Image.Image | np.ndarray, width: int, height: int) -> np.ndarray:
        """A picture -> scaled latents (1, C, H/f, W/f): the VAE posterior's mean (diffusers samples it)."""
        self.graph("vae_encoder")
        pixels = from_pil(image, width, height)  # (1, 3, H, W) in [-1, 1]
        moments = self._run("vae_encoder", {"sample": pixels})["latent_parameters"]  # (1, 2C, h, w)
        mean = moments[:, : moments.shape[1] // 2]
        return (mean * self.constants.vae_scaling_factor).astype(np.float32)

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """Latents (N, C, h, w) -> images, one VAE call per image to bound peak memory."""
        images = []
        for z in latents:
            z = (z[None] / self.constants.vae_scaling_factor).astype(np.float32)
            images += to_pil(self._run("vae_decoder", {"latent_sample": z})["sample"])
        return images

    # --- text to image ----------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        latents: np.ndarray | None = None,
        scheduler: str | dict | None = None,
        callback: ProgressCallback | None = None,
        noise: sampling.NoiseFn | None = None,
        noise_generator: NoiseGenerator = "numpy",
        eta: float | None = None,
        image: Image.Image | np.ndarray | None = None,
        strength: float = 0.8,
    ) -> GenerationResult:
        """Generate images; arguments follow diffusers' StableDiffusionPipeline.

        `latents`: initial standard-normal noise (N, C, H/f, W/f), scaled by the
        scheduler's initial sigma exactly as diffusers does. `noise`: the source of
        fresh noise for ancestral samplers (default: a generator seeded by `seed`).
        `noise_generator`: what `seed` seeds, for the initial and the per-step noise: "numpy" (NumPy's PCG64)
        or "torch-cpu" (torch's CPU `randn`, bit for bit, without torch: a diffusers picture's seed gives
        the same noise; `edgesd.torch_noise`).
        `num_inference_steps` / `guidance_scale` default to the model's own defaults (20 / 7.5
        unless its manifest says otherwise; `Pipeline.defaults`).
        `guidance_rescale`: 0-1, pulls the guided prediction's spread back towards the conditional one's
        (Lin et al. 2023), against the over-saturation of high guidance scales; as diffusers' argument.
        `eta`: DDIM's noise level (default 0: deterministic; 1 DDPM-like) or TCD's gamma (default 0.3);
        other samplers ignore it, as in diffusers.
        `image` (img2img): a starting picture, resized to width x height (default: its own size); it is
        noised to the point `strength` of the schedule (1: pure noise) and only the remaining
        int(steps * strength) steps run, as in diffusers' StableDiffusionImg2ImgPipeline.
        """
        started = time.perf_counter()
        self._seconds, self._calls = {}, {}
        compiled_before = self._compile_seconds()
        defaults = self.defaults
        steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = defaults.guidance_scale if guidance_scale is None else guidance_scale
        if image is not None:
            width, height = _image_size(image, width, height, strength)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise EdgesdError(f"guidance_rescale must be between 0 and 1, got {guidance_rescale}", "use e.g. 0.7")
        req = self._request(prompt, negative_prompt, steps, guidance, width, height,
                            seed, num_images_per_prompt, eta)
        start, x0 = self._img2img_start(image, strength, req) if image is not None else (0, None)
        sched = resolve_scheduler(scheduler, self.folder.scheduler_config)
        draw = noise_source(noise_generator, req.seed)
        x = self._initial_latents(req, latents, draw)
        denoiser = Denoiser(
            unet=self.unet,
            context=self._context(req),
            guidance_scale=req.guidance_scale,
            guidance_rescale=guidance_rescale,
            prediction_type=sched.prediction_type,
            alphas_cumprod=alphas_cumprod(sched),
        )
        noise = noise or draw
        x = _run_sampler(sched, denoiser, x, req.steps, noise, _checked(callback), eta, start, x0)
        images = self.decode(x)
        params = {
            "prompt": req.prompts[0] if len(req.prompts) == 1 else req.prompts,
            "negative_prompt": req.negative_prompts[0] if len(set(req.negative_prompts)) == 1 else req.negative_prompts,
            "steps": req.steps, "scheduler": sched.name, "guidance_scale": req.guidance_scale,
            **({"guidance_rescale": guidance_rescale} if guidance_rescale else {}),
            "seed": req.seed, "width": req.width, "height": req.height,
            **({"noise_generator": noise_generator} if noise_generator != "numpy" else {}),
            "model": self.folder.root.name, **self._backend_parameters(),
        }
        if image is not None:
            params["strength"] = strength
        limit = self.tokenizer.max_length - 2
        warnings = [f"prompt cut to its first {limit} tokens ({n} given): {text[:40]!r}..."
                    for text in dict.fromkeys(req.prompts + req.negative_prompts)
                    if (n := self.tokenizer.token_count(text)) > limit]
        timings = {f"{name}_s": round(t, 4) for name, t in self._seconds.items()}
        if compiled := self._compile_seconds() - compiled_before:  # OpenVINO compiling for a new size (included above)
            timings["compile_s"] = round(compiled, 4)
        timings.update({"unet_calls": self._calls.get("unet", 0), "total_s": round(time.perf_counter() - started, 4)})
        return GenerationResult(images=images, seed=req.seed, parameters=params, latents=x, timings=timings,
                                warnings=warnings)

    def _request(self, prompt, negative_prompt, steps, guidance, width, height, seed, per_prompt,
                 eta) -> _Request:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise EdgesdError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise EdgesdError(f"{len(negatives)} negative prompts for {len(prompts)} prompts",
                                  "give one negative prompt per prompt, or a single one")
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise EdgesdError(f"steps must be between 1 and {MAX_STEPS}, got {steps}", "use e.g. 20")
        if eta is not None and not 0.0 <= eta <= 1.0:
            raise EdgesdError(f"eta must be between 0 and 1, got {eta}", "use 0 for deterministic DDIM")
        if guidance < 0 or not np.isfinite(guidance):
            raise EdgesdError(f"guidance scale must be >= 0, got {guidance}", "use e.g. 7.5, or 1 for no guidance")
        if not isinstance(per_prompt, (int, np.integer)) or per_prompt < 1:
            raise EdgesdError(f"images per prompt must be >= 1, got {per_prompt}")
        size = self.constants.default_image_size
        width, height = width or size, height or size
        multiple = self.constants.image_size_multiple
        for name, value in (("width", width), ("height", height)):
            if value % multiple or value <= 0:
                raise EdgesdError(f"{name} {value} is not a positive multiple of {multiple}",
                                  f"this model needs sizes in steps of {multiple}, e.g. {size}")
        if seed is None:
            seed = secrets.randbelow(2**32)
        return _Request(prompts, negatives, int(steps), float(guidance), int(width), int(height), int(seed),
                        int(per_prompt))

    def _img2img_start(self, image, strength: float, req: _Request) -> tuple[int, np.ndarray]:
        """The step img2img starts at, and the picture's latents for the whole batch (B, C, h, w)."""
        start = strength_start(req.steps, strength)
        if start >= req.steps:
            raise EdgesdError(f"strength {strength} with {req.steps} steps leaves no step to run",
                              f"raise strength to at least {1 / req.steps:.2f} or take more steps")
        return start, np.repeat(self.encode_image(image, req.width, req.height), req.batch, 0)

    def _context(self, req: _Request) -> np.ndarray:
        """Text conditioning, [uncond; cond] stacked for one batched U-Net call when guiding."""
        repeat = req.images_per_prompt
        if req.guidance_scale > 1.0:
            hidden = self.encode_prompts(req.negative_prompts + req.prompts)  # (2P, S, D)
            uncond, cond = np.split(hidden, 2)
            return np.concatenate([np.repeat(uncond, repeat, 0), np.repeat(cond, repeat, 0)])  # (2B, S, D)
        return np.repeat(self.encode_prompts(req.prompts), repeat, 0)  # (B, S, D)

    def _initial_latents(self, req: _Request, latents: np.ndarray | None, draw: sampling.NoiseFn) -> np.ndarray:
        c = self.constants
        shape = (req.batch, c.latent_channels, req.height // c.vae_scale_factor, req.width // c.vae_scale_factor)
        if latents is None:
            return draw(shape)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise EdgesdError(f"latents have shape {latents.shape}, expected {shape}",
                              "match the batch (prompts x images per prompt), channels and size / "
                              f"{c.vae_scale_factor}")
        return latents


def resolve_backend(folder: ModelFolder, backend: str) -> str:
    """"auto" -> openvino for a folder with OpenVINO IR graphs, else onnxruntime; check the folder fits."""
    formats = {name: folder.graph_format(name) for name in GRAPHS if folder.has(name)}
    if backend == "auto":
        backend = "openvino" if "openvino" in formats.values() else "onnxruntime"
    ir = [name for name, fmt in formats.items() if fmt == "openvino"]
    if backend == "onnxruntime" and ir:
        raise EdgesdError(f"'{folder.root}' holds OpenVINO IR graphs ({', '.join(ir)}), which ONNX Runtime cannot run",
                          "use --backend openvino (or leave --backend at auto)")
    if backend == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise EdgesdError("the OpenVINO backend needs the openvino package",
                              "pip install -c constraints.txt 'edgesd[openvino]'") from None
    return backend


def _checked(callback: ProgressCallback | None) -> sampling.StepCallback | None:
    if callback is None:
        return None

    def step(i: int, n: int) -> None:
        if callback(i, n) is False:
            raise Cancelled(f"cancelled after step {i} of {n}")

    return step


def _x0_limit(sched: SchedulerConfig) -> sampling.LimitFn | None:
    """Dynamic thresholding, else clipping, of x0 as the config asks (diffusers' order of precedence)."""
    if sched.config.get("thresholding"):
        return sampling.dynamic_threshold_x0(sched["dynamic_thresholding_ratio"], sched["sample_max_value"])
    if sched.config.get("clip_sample"):
        return sampling.clip_x0(sched["clip_sample_range"])
    return None


def _image_size(image, width: int | None, height: int | None, strength: float) -> tuple[int, int]:
    """Check an img2img picture and its strength; the size defaults to the picture's own."""
    if not isinstance(image, (Image.Image, np.ndarray)):
        raise EdgesdError(f"image must be a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    if not 0.0 < strength <= 1.0:
        raise EdgesdError(f"strength must be in (0, 1], got {strength}", "use e.g. 0.75")
    if isinstance(image, np.ndarray) and image.ndim != 3:
        raise EdgesdError(f"image array has shape {image.shape}", "pass an (H, W, 3) uint8 array or a PIL image")
    native = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    return width or native[0], height or native[1]


def strength_start(steps: int, strength: float) -> int:
    """The step img2img starts at for `strength` (1: from pure noise, all steps), as diffusers counts it."""
    return steps - min(int(steps * strength), steps)


def _sigma_sampler(sched: SchedulerConfig, denoise, x: np.ndarray, s: sampling.SigmaSchedule,
                   noise: sampling.NoiseFn, callback, limit) -> np.ndarray:
    """Run the sigma-space sampler of `sched`'s class (or the k-diffusion sampler it names)."""
    if sched.k_sampler == "dpmpp_2s_ancestral":
        return sampling.sample_dpmpp_2s_ancestral(denoise, x, s, noise, callback)
    if sched.class_name == "EulerAncestralDiscreteScheduler":
        return sampling.sample_euler_ancestral(denoise, x, s, noise, callback)
    if sched.class_name == "DPMSolverMultistepScheduler" and sched["algorithm_type"] == "sde-dpmsolver++":
        return sampling.sample_dpmpp_2m_sde(denoise, x, s, noise, callback, sched["lower_order_final"])
    if sched.class_name == "DPMSolverMultistepScheduler":
        return sampling.sample_dpmpp_2m(denoise, x, s, callback, sched["lower_order_final"])
    if sched.class_name == "UniPCMultistepScheduler":
        return sampling.sample_unipc(denoise, x, s, callback, sched["lower_order_final"], sched["solver_order"],
                                     sched["solver_type"], tuple(sched["disable_corrector"]))
    if sched.class_name == "DPMSolverSinglestepScheduler":
        orders = sampling.singlestep_orders(len(s.timesteps), sched["solver_order"], sched["lower_order_final"],
                                            float(s.sigmas[-1]) == 0.0)
        return sampling.sample_dpmpp_2s(denoise, x, s, orders, callback, sched["solver_type"])
    if sched.class_name == "DEISMultistepScheduler":
        return sampling.sample_deis(denoise, x, s, callback, sched["solver_order"], sched["lower_order_final"])
    if sched.class_name == "DPMSolverSDEScheduler":
        return sampling.sample_dpmpp_sde(denoise, x, s, noise, callback)
    if sched.class_name == "KDPM2DiscreteScheduler":
        return sampling.sample_dpm_2(denoise, x, s, callback)
    if sched.class_name == "KDPM2AncestralDiscreteScheduler":
        return sampling.sample_dpm_2_ancestral(denoise, x, s, noise, callback)
    if sched.class_name == "LMSDiscreteScheduler":
        return sampling.sample_lms(denoise, x, s, callback)
    if sched.class_name == "HeunDiscreteScheduler":
        return sampling.sample_heun(denoise, x, s, callback, limit)
    return sampling.sample_euler(denoise, x, s, callback)


def _run_sampler(sched: SchedulerConfig, d: Denoiser, noise_x: np.ndarray, steps: int,
                 noise: sampling.NoiseFn, callback, eta: float | None = None, start: int = 0,
                 x0: np.ndarray | None = None) -> np.ndarray:
    """Scale the initial noise as diffusers does and run the chosen sampler.

    With `x0` (img2img: the clean latents), noise it to the schedule's step `start` and begin there.
    """
    limit = _x0_limit(sched)
    if sched.is_sigma_space:
        s = sampling.starting_at(sigma_schedule(sched, steps), start)
        if x0 is None:
            x = noise_x * np.float32(s.init_noise_sigma)
        else:  # x = x0 + sigma n, in the sigma-space coordinates every sigma sampler here uses
            x = (x0 + noise_x * s.sigmas[start]).astype(np.float32)
        denoise = d.denoise
        if limit is not None and sched.class_name != "HeunDiscreteScheduler":  # DPM++, UniPC: on x0 itself
            denoise = lambda x_, sigma, t: limit(d.denoise(x_, sigma, t))  # noqa: E731
        x = _sigma_sampler(sched, denoise, x, s, noise, callback, limit)
        if sched.class_name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                                "DPMSolverSinglestepScheduler"):
            # diffusers' DPM-Solver and UniPC keep the variance-preserving sample: at a final sigma_min > 0
            # that is ours divided by sqrt(1 + sigma^2) (at sigma 0 they are the same)
            x = (x / np.sqrt(1.0 + float(s.sigmas[-1]) ** 2)).astype(np.float32)
        return x
    s = sampling.starting_at(alpha_schedule(sched, steps), start)
    x = noise_x
    if x0 is not None:  # q(x_t | x_0) (Ho et al. 2020, Eq. 4)
        a = float(s.alphas_cumprod[int(s.timesteps[start])])
        x = (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise_x).astype(np.float32)
    if sched.class_name == "DDIMScheduler":
        return sampling.sample_ddim(d.predict, x, s, callback, limit, eta or 0.0, noise)
    if sched.class_name == "LCMScheduler":
        return sampling.sample_lcm(d.predict, x, s, noise, callback, limit, sched["timestep_scaling"])
    if sched.class_name == "TCDScheduler":
        return sampling.sample_tcd(d.predict, x, s, noise, callback, 0.3 if eta is None else eta)
    if sched.class_name == "DDPMScheduler":
        return sampling.sample_ddpm(d.predict, x, s, noise, callback, limit)
    return sampling.sample_plms(d.eps, x, s, callback)
