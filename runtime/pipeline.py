"""Generation with exported graphs; everything but the networks runs in NumPy.

`Pipeline` is a loaded model and holds nothing about any one generation: `Pipeline.run(request)` keeps a
generation's state (timings, backend requests) in a `RunContext`, so threads may share one Pipeline.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import sampling
from .backends import Graph, RuntimeOptions, load_graph
from .denoiser import Denoiser
from .errors import Cancelled, EdgesdError
from .families import ModelFamily
from .graphs import DEEP_FEATURES, TOME_RATIO, UNET_SHALLOW, UNET_TOME
from .heap import give_back_freed_memory, keep_large_blocks_off_heap
from .images import from_pil, mask_from_picture, to_pil
from .lora import LoraSpec, constant_deltas, lora_deltas, read_weight_map
from .model import DecoderFolder, ModelFolder, VaeSettings
from .models_path import default_model_path
from .noise import noise_source
from .preview import Previewer
from .request import GenerationRequest, GenerationResult
from .samplers import guidance_boundary, noise_at, run_sampler, schedule_for
from .schedulers import alphas_cumprod, resolve_scheduler
from .tiling import TilingMode, decode_latents, encode_pixels
from .tokenizer import ClipTokenizer

# callback(step, total) or callback(step, total, preview) after each U-Net evaluation (PLMS makes steps + 1);
# preview() -> the current estimate as pictures (edgesd.preview); returning False cancels.
ProgressCallback = Callable[..., "bool | None"]


class FeatureCache:
    """DeepCache (Ma et al. 2023, Sec. 3.2): of each conditioning's U-Net evaluations, every `interval`-th runs
    the whole U-Net and keeps its deep features (the last up block's input); those between run the shallow
    graph on them. Kept per conditioning (split guidance alternates the negative and positive prompt's) and
    batch shape (a guidance cutoff halves the batch), each starting with a whole evaluation."""

    def __init__(self, interval: int):
        self.interval = interval
        self._kept: dict[tuple, list] = {}  # key -> [evaluations so far, deep features (M, C', h', w')]

    @staticmethod
    def _key(sample: np.ndarray, cond: dict[str, np.ndarray]) -> tuple:
        # the denoiser passes the same conditioning arrays at every step
        return (sample.shape, *(id(v) for v in cond.values()))

    def features(self, sample: np.ndarray, cond: dict[str, np.ndarray]) -> np.ndarray | None:
        """The kept features, if this evaluation may reuse them; None: run the whole U-Net."""
        kept = self._kept.get(self._key(sample, cond))
        if kept is None or kept[0] % self.interval == 0:
            return None
        kept[0] += 1
        return kept[1]

    def keep(self, sample: np.ndarray, cond: dict[str, np.ndarray], features: np.ndarray) -> None:
        key = self._key(sample, cond)
        count = self._kept[key][0] if key in self._kept else 0
        self._kept[key] = [count + 1, features]


class RunContext:
    """One generation's state: graph timings and calls, and each backend's per-caller state."""

    def __init__(self, pipe: "Pipeline"):
        self.pipe = pipe
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.local: dict[str, dict] = {}  # per graph: what a backend keeps for this caller (OpenVINO requests)
        self.released_compile_s = 0.0  # compile time of the graphs released before the end
        # the train timestep of the picture's last step: U-Net runs at or below it end the U-Net's stage
        self.last_step_t: float | None = None
        self.feature_cache: FeatureCache | None = None  # DeepCache, when the request asks for it
        self.token_merging: np.ndarray | None = None  # ToMe's ratio (1,), when the request asks for it
        self.started = time.perf_counter()

    def release(self, name: str) -> None:
        """Drop what a backend keeps for graph `name` (its compile time stays counted)."""
        self.released_compile_s += self.local.pop(name, {}).get("compile_s", 0.0)

    def run(self, name: str, feeds: dict[str, np.ndarray], release: bool = True) -> dict[str, np.ndarray]:
        """Run graph `name`. `release`: its stage of the picture ends with this run (Graph.run), true of every
        graph but the U-Net, which runs once per step (a VAE tile is a stage of its own)."""
        graph = self.pipe.graphs.get(name) or self.pipe.graph(name)  # loaded graphs without the loading lock
        start = time.perf_counter()
        out = graph.run(feeds, self.local.setdefault(name, {}), release)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.calls[name] = self.calls.get(name, 0) + 1
        passed_on = {t.name for t in graph.spec.added_outputs}  # checked in the output of the graph they feed
        for output, value in out.items():  # a NaN would end as a black picture, said nowhere
            if output not in passed_on and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise EdgesdError(f"the {name} graph returned NaN or infinite values ({output}, call "
                                  f"{self.calls[name]})", "check the model's export (edgesd export runs its parity "
                                  "check) and the inputs, e.g. latents")
        return out

    def unet(self, sample: np.ndarray, timestep: np.ndarray, **cond: np.ndarray) -> np.ndarray:
        last_step = self.last_step_t is not None and float(timestep[0]) <= self.last_step_t
        feeds = {"sample": sample, "timestep": timestep, **cond}
        cache = self.feature_cache
        features = None if cache is None else cache.features(sample, cond)
        if features is not None:
            out = self.run(UNET_SHALLOW, {**feeds, DEEP_FEATURES: features}, release=last_step)["out_sample"]
        elif self.token_merging is not None:
            out = self.run(UNET_TOME, {**feeds, TOME_RATIO.name: self.token_merging}, release=last_step)["out_sample"]
        else:
            outputs = self.run("unet", feeds, release=last_step)
            if cache is not None:
                if DEEP_FEATURES not in outputs:
                    raise EdgesdError(f"the unet graph has no {DEEP_FEATURES} output beside {UNET_SHALLOW}/",
                                      "export the model again and add DeepCache's graphs with `edgesd deepcache`")
                cache.keep(sample, cond, outputs[DEEP_FEATURES])
            out = outputs["out_sample"]
        want = (sample.shape[0], self.pipe.constants.latent_channels, *sample.shape[2:])
        if out.shape != want:  # a broken or foreign graph: say so rather than fail somewhere in a sampler
            raise EdgesdError(f"the unet graph returned shape {out.shape} for a sample of shape {sample.shape} "
                              f"(expected {want})", "re-export the model")
        return out

    def timings(self) -> dict:
        timings = {f"{name}_s": round(t, 4) for name, t in self.seconds.items()}
        compiled = self.released_compile_s + sum(local.get("compile_s", 0.0) for local in self.local.values())
        if compiled:  # OpenVINO compiling for a new size (included above)
            timings["compile_s"] = round(compiled, 4)
        for variant in (UNET_SHALLOW, UNET_TOME):
            if variant in self.calls:
                timings[f"{variant}_calls"] = self.calls[variant]
        timings.update({"unet_calls": self.calls.get("unet", 0),
                        "total_s": round(time.perf_counter() - self.started, 4)})
        return timings


class Pipeline:
    """A loaded model: `Pipeline.load(path)(prompt, ...)` -> GenerationResult."""

    def __init__(self, folder: ModelFolder, graphs: dict[str, Graph], tokenizers: dict[str, ClipTokenizer],
                 options: RuntimeOptions, decoder: VaeSettings | None = None, loras: tuple[LoraSpec, ...] = (),
                 weight_deltas: dict[str, dict] | None = None):
        self.folder = folder
        self.family: ModelFamily = folder.family
        self.specs = folder.specs
        self.graphs = graphs
        self.tokenizers = tokenizers
        self.options = options  # backend resolved: "onnxruntime" or "openvino"
        self.vae = VaeSettings.from_config(folder.configs.get("vae", {}), folder.constants.default_image_size)
        self.decoder = decoder or self.vae  # another decoder than the model's own VAE (TAESD)
        self.loras = loras
        # component -> graph constant -> LoRA delta, each taken (and freed) when its graph loads
        self._weight_deltas = dict(weight_deltas or {})
        self._lora_components = frozenset(self._weight_deltas)
        self._loading = threading.Lock()
        self._from_folder: set[str] = set()  # graphs graph() loaded from the folder (memory "low" frees them)
        self._one_at_a_time = threading.Lock()  # memory "low": a call's stages free graphs another would use
        encode = (lambda x: self._encode_pixels(x, RunContext(self), "off")) if folder.has("vae_encoder") else None
        self.previewer = Previewer(encode, self.decode, folder.constants.vae_scale_factor, self.decoder is not self.vae)

    @classmethod
    def load(cls, path: str | Path | None = None, options: RuntimeOptions | None = None,
             vae_decoder: str | Path | None = None, loras=(), **option_values) -> "Pipeline":
        """Load a model folder (default: the embedded model).

        `options` (or its fields as keywords: `provider="cpu"`, `threads=2`, `backend="openvino"`, ...) choose
        the backend and tune it; see RuntimeOptions. `vae_decoder`: a decoder exported on its own (TAESD:
        `edgesd export TAESD_DIR OUT`) that decodes in place of the model's VAE. `loras`: (FILE, SCALE) pairs
        (or LoraSpec) added to the fp32 / fp16 graphs' weights as they load; the files on disk are unchanged.
        """
        try:
            options = replace(options or RuntimeOptions(), **option_values)
        except TypeError as e:
            raise EdgesdError(f"Pipeline.load: {e}", "see edgesd.RuntimeOptions for the options") from None
        folder = ModelFolder.open(default_model_path() if path is None else path)
        options = options.for_backend(resolve_backend(folder, options.backend))
        tokenizers = {enc.tokenizer: ClipTokenizer.from_folder(folder.root / enc.tokenizer)
                      for enc in folder.family.text_encoders}
        graphs, decoder = {}, None
        if vae_decoder is not None:
            other = DecoderFolder.open(vae_decoder)
            decoder = other.settings()
            if decoder.latent_channels != folder.constants.latent_channels:
                raise EdgesdError(f"the VAE decoder '{other.root}' takes {decoder.latent_channels} latent channels, "
                                  f"the model makes {folder.constants.latent_channels}", "pass a decoder for this model")
            graphs["vae_decoder"] = load_graph(other.graph_path(), folder.specs["vae_decoder"],
                                               options.for_component("vae_decoder"))
        specs = _lora_specs(loras)
        if options.memory == "low":
            keep_large_blocks_off_heap()
        pipe = cls(folder, graphs, tokenizers, options, decoder, specs, _lora_constants(folder, specs))
        for name in (*folder.family.text_components, "unet", "vae_decoder"):
            if options.memory == "fast":
                pipe.graph(name)
            elif not folder.has(name):  # memory "low" loads it at its stage; a missing one is said now
                raise EdgesdError(f"model '{folder.root}' has no {name}", "re-export the model")
        return pipe

    def with_loras(self, loras) -> "Pipeline":
        """This model with other LoRAs (none: its own weights): only the graphs they change are loaded again."""
        specs = _lora_specs(loras)
        deltas = _lora_constants(self.folder, specs)
        changed = set(deltas) | self._lora_components
        kept = {name: graph for name, graph in self.graphs.items() if name not in changed}
        pipe = Pipeline(self.folder, kept, self.tokenizers, self.options, self.decoder if self.decoder is not
                        self.vae else None, specs, deltas)
        if self.options.memory == "fast":
            for name in (*self.family.text_components, "unet"):
                pipe.graph(name)
        return pipe

    def graph(self, name: str) -> Graph:
        """The loaded graph of component `name`, loading it on first use (the VAE encoder only img2img needs)."""
        with self._loading:
            if name not in self.graphs:
                if not self.folder.has(name):
                    fix = "re-export the model" + (" without --no-vae-encoder" if name == "vae_encoder" else "")
                    raise EdgesdError(f"model '{self.folder.root}' has no {name}", fix)
                # a LoRA's deltas are freed once used, unless memory "low" will load the graph again
                deltas = (self._weight_deltas.get(name) if self.options.memory == "low"
                          else self._weight_deltas.pop(name, None))
                self.graphs[name] = load_graph(self.folder.graph_path(name), self.specs[name],
                                               self.options.for_component(name), deltas)
                self._from_folder.add(name)
            return self.graphs[name]

    def _one_unet_resident(self, wanted: str) -> None:
        """The token-merging U-Net is the whole U-Net again (the same weights): a request for one frees the
        other where it was loaded from the folder, so memory holds one of them."""
        other = "unet" if wanted == UNET_TOME else UNET_TOME
        with self._loading:
            if other not in self._from_folder or not self.folder.has(UNET_TOME):
                return
            self._from_folder.discard(other)
            del self.graphs[other]
        give_back_freed_memory()

    def _stage_done(self, *names: str, ctx: RunContext | None = None) -> None:
        """Memory "low": free the graphs of a finished stage (those loaded from the folder; another decoder
        given at load stays), with what `ctx` keeps for them (an OpenVINO request holds its compiled model)."""
        if self.options.memory != "low":
            return
        if ctx is not None:
            for name in names:
                ctx.release(name)
        with self._loading:
            freed = [name for name in names if name in self._from_folder]
            for name in freed:
                self._from_folder.discard(name)
                del self.graphs[name]
        if freed:
            give_back_freed_memory()

    def placement(self) -> dict[str, dict[str, int]]:
        """Each graph's nodes per provider (or OpenVINO device); every graph the model has is loaded for it."""
        names = [n for n in (*self.family.text_components, "unet", UNET_SHALLOW, UNET_TOME, "vae_decoder", "vae_encoder")
                 if n in self.graphs or self.folder.has(n)]
        return {name: dict(self.graph(name).placement) for name in names}

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The (first) text encoder's tokenizer."""
        return self.tokenizers[self.family.text_encoders[0].tokenizer]

    @property
    def constants(self):
        return self.folder.constants

    @property
    def defaults(self):
        """The model's default steps and guidance scale (GenerationDefaults)."""
        return self.folder.defaults

    def _backend_parameters(self) -> dict:
        """What ran the graphs, for the image's parameters."""
        run = ({"backend": "openvino", "device": self.options.device} if self.options.backend == "openvino"
               else {"provider": self.options.provider})
        if self.options.component_providers:
            run["component_providers"] = dict(self.options.component_providers)
        if self.loras:
            run["loras"] = [str(spec) for spec in self.loras]
        if self.decoder is not self.vae:
            run["vae_decoder"] = "other"
        return run

    # --- the stages -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], prompts_2: list[str] | None = None) -> np.ndarray:
        """Prompts -> the U-Net's text conditioning, encoder_hidden_states (N, S, D)."""
        embeds = self.family.encode_text(prompts, prompts_2 or prompts, self.tokenizers, self.specs,
                                         RunContext(self).run)
        return embeds["encoder_hidden_states"]

    def encode_image(self, image: Image.Image | np.ndarray, width: int, height: int,
                     ctx: RunContext | None = None) -> np.ndarray:
        """A picture -> scaled latents (1, C, H/f, W/f): the VAE posterior's mean (diffusers samples it)."""
        return self._encode_pixels(from_pil(image, width, height), ctx or RunContext(self))

    def _encode_pixels(self, pixels: np.ndarray, ctx: RunContext, tiling: TilingMode = "auto",
                       tile_size: int | None = None) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> scaled latents (1, C, H/f, W/f), in tiles of `tile_size` pixels (None:
        the VAE's sample size) where `tiling` says."""
        def encode(x: np.ndarray) -> np.ndarray:
            return ctx.run("vae_encoder", {"sample": x})["latent_parameters"]  # (1, 2C, h, w)

        moments = encode_pixels(pixels, encode, tile_size or self.vae.sample_size, self.constants.vae_scale_factor,
                                tiling)
        mean = moments[:, : moments.shape[1] // 2]
        return (mean * self.vae.scaling_factor).astype(np.float32)

    def decode(self, latents: np.ndarray, ctx: RunContext | None = None,
               tiling: TilingMode = "auto", tile_size: int | None = None) -> list[Image.Image]:
        """Latents (N, C, h, w) -> images, one VAE call per image (or per tile of `tile_size` pixels, None: the
        decoder's sample size) to bound peak memory."""
        ctx = ctx or RunContext(self)

        def decode(z: np.ndarray) -> np.ndarray:
            return ctx.run("vae_decoder", {"latent_sample": z})["sample"]  # (1, 3, H, W)

        images = []
        for z in latents:
            z = (z[None] / self.decoder.scaling_factor).astype(np.float32)  # (1, C, h, w)
            images += to_pil(decode_latents(z, decode, tile_size or self.decoder.sample_size,
                                            self.constants.vae_scale_factor, tiling))
        return images

    # --- generation -------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 callback: ProgressCallback | None = None, noise: sampling.NoiseFn | None = None,
                 **fields) -> GenerationResult:
        """Generate images; arguments follow diffusers' pipelines (StableDiffusionPipeline, ...XLPipeline,
        ...InpaintPipeline, LatentConsistencyModelPipeline) and are the fields of GenerationRequest:

        `width`, `height`, `seed`, `num_images_per_prompt`, `guidance_rescale` (0-1, Lin et al. 2023),
        `guidance_cutoff` ((0, 1]: guide only the first ceil(cutoff x steps) steps, the rest at half the batch),
        `deepcache_interval` (DeepCache, after `edgesd deepcache`), `token_merging` (ToMe's share of merged
        tokens, after `edgesd tome`),
        `latents` (initial standard-normal noise (N, C, H/f, W/f), scaled as diffusers does),
        `scheduler` (a name or a diffusers config dict), `eta` (DDIM's noise level, TCD's gamma),
        `noise_generator` ("numpy" or "torch-cpu": torch's CPU randn bit for bit, so diffusers' seeds carry
        over), `image` + `strength` (img2img), `mask_image` (inpainting, white = repaint), and for SDXL
        `prompt_2`, `negative_prompt_2`, `original_size`, `crops_coords_top_left`, `target_size`.
        `num_inference_steps` / `guidance_scale` default to the model's own (`Pipeline.defaults`).
        `callback(step, total)` or `callback(step, total, preview)` after each U-Net call (`preview()`: the current
        estimate as pictures, see edgesd.preview); returning False raises Cancelled.
        `noise`: the source of fresh noise for stochastic samplers (default: drawn from `seed`).
        """
        try:
            request = GenerationRequest.build(self.folder, self.family, prompt, negative_prompt,
                                              num_inference_steps, guidance_scale, **fields)
        except TypeError as e:
            raise EdgesdError(f"Pipeline: {e}", "see edgesd.GenerationRequest for the arguments") from None
        return self.run(request, callback=callback, noise=noise)

    def run(self, request: GenerationRequest, callback: ProgressCallback | None = None,
            noise: sampling.NoiseFn | None = None) -> GenerationResult:
        """Generate the pictures of `request` (built by GenerationRequest.build, which checks it)."""
        if self.options.memory == "low":
            with self._one_at_a_time:
                try:
                    return self._generate(request, callback, noise)
                finally:  # a cancelled or failed call leaves nothing loaded either
                    self._stage_done(*self.family.text_components, "unet", UNET_SHALLOW, UNET_TOME, "vae_decoder",
                                     "vae_encoder")
        return self._generate(request, callback, noise)

    def _generate(self, request: GenerationRequest, callback: ProgressCallback | None,
                  noise: sampling.NoiseFn | None) -> GenerationResult:
        ctx = RunContext(self)
        sched = resolve_scheduler(request.scheduler, self.folder.scheduler_config)
        draw = noise_source(request.noise_generator, request.seed)
        noise_x = self._initial_noise(request, draw)
        start = _Start()
        if request.image is not None:
            start = self._picture_start(request, ctx, noise_x)
            self._stage_done("vae_encoder", ctx=ctx)
        cond = self.family.conditioning(request, self.folder.configs, self.tokenizers, ctx.run)
        self._stage_done(*self.family.text_components, ctx=ctx)
        denoiser = Denoiser(
            unet=ctx.unet, cond=cond.stacked(),
            guidance_scale=request.guidance_scale if self.family.classifier_free else 1.0,
            guidance_rescale=request.guidance_rescale, prediction_type=sched.prediction_type,
            alphas_cumprod=alphas_cumprod(sched), concat=start.concat,
            guided_down_to=guidance_boundary(sched, request.steps, start.step, request.guidance_cutoff),
            split_guidance=self.options.split_guidance(),
        )
        step = _checked(callback, lambda: self.previewer(denoiser.latest_x0))
        # every sampler's last step evaluates at or below its last timestep, every earlier step above it
        # (Heun's second evaluation of the step before reaches it too: one early release, nothing wrong)
        ctx.last_step_t = float(schedule_for(sched, request.steps, start.step).timesteps[-1])
        if request.deepcache_interval > 1:
            if "unet" in self._lora_components:
                raise EdgesdError("DeepCache with a LoRA on the U-Net is not supported yet",
                                  "leave deepcache_interval at 1 with LoRAs")
            ctx.feature_cache = FeatureCache(int(request.deepcache_interval))
        if request.token_merging > 0:
            if "unet" in self._lora_components:
                raise EdgesdError("token merging with a LoRA on the U-Net is not supported yet",
                                  "leave token_merging at 0 with LoRAs")
            ctx.token_merging = np.array([request.token_merging], np.float32)
        self._one_unet_resident(UNET_TOME if request.token_merging > 0 else "unet")
        x = run_sampler(sched, denoiser, noise_x, request.steps, noise or draw, step, request.eta,
                        start.step, start.x0, start.after_step)
        self._stage_done("unet", UNET_SHALLOW, UNET_TOME, ctx=ctx)
        images = self.decode(x, ctx, request.vae_tiling, request.vae_tile_size)
        self._stage_done("vae_decoder", ctx=ctx)
        params = request.parameters(sched.name, self.folder.root.name, self._backend_parameters())
        timings = {**ctx.timings(), "unet_evaluations": denoiser.evaluations}
        return GenerationResult(images=images, seed=request.seed, parameters=params, latents=x,
                                timings=timings, warnings=self._warnings(request), request=request)

    def _warnings(self, request: GenerationRequest) -> list[str]:
        tok = self.tokenizer
        limit = tok.max_length - 2
        texts = [*request.prompts, *(request.negative_prompts or ())]
        return [f"prompt cut to its first {limit} tokens ({n} given): {text[:40]!r}..."
                for text in dict.fromkeys(texts) if (n := tok.token_count(text)) > limit]

    def _initial_noise(self, request: GenerationRequest, draw: sampling.NoiseFn) -> np.ndarray:
        c = self.constants
        shape = (request.batch, c.latent_channels, request.height // c.vae_scale_factor,
                 request.width // c.vae_scale_factor)
        if request.latents is None:
            return draw(shape)
        latents = np.asarray(request.latents, dtype=np.float32)
        if latents.shape != shape:
            raise EdgesdError(f"latents have shape {latents.shape}, expected {shape}",
                              "match the batch (prompts x images per prompt), channels and size / "
                              f"{c.vae_scale_factor}")
        return latents

    def _picture_start(self, request: GenerationRequest, ctx: RunContext, noise_x: np.ndarray) -> "_Start":
        """img2img and inpainting: where the sampler starts, from which latents, and what it blends or concats."""
        steps, strength = request.steps, request.denoising_strength
        first = strength_start(steps, strength)
        if first >= steps:
            raise EdgesdError(f"strength {strength} with {steps} steps leaves no step to run",
                              f"raise strength to at least {1 / steps:.2f} or take more steps")
        self.graph("vae_encoder")
        w, h, batch = request.width, request.height, request.batch
        pixels = from_pil(request.image, w, h)  # (1, 3, H, W)
        # diffusers starts from pure noise at full strength when it inpaints, from the noised picture otherwise
        pure_noise = request.mask_image is not None and strength >= 1.0
        needs_x0 = not (pure_noise and self.family.inpaint_unet)
        tiles = (request.vae_tiling, request.vae_tile_size)
        x0 = np.repeat(self._encode_pixels(pixels, ctx, *tiles), batch, 0) if needs_x0 else None  # (B, C, h, w)
        if request.mask_image is None:
            return _Start(first, x0)
        mask = mask_from_picture(request.mask_image, w, h)  # (1, 1, H, W), 1 = repaint
        f = self.constants.vae_scale_factor
        mask_latent = np.repeat(mask[:, :, ::f, ::f], batch, 0)  # nearest, as torch's interpolate: (B, 1, h, w)
        start_x0 = None if pure_noise else x0
        if self.family.inpaint_unet:  # the U-Net sees the mask and the picture outside it
            masked = np.repeat(self._encode_pixels((pixels * (mask < 0.5)).astype(np.float32), ctx, *tiles),
                               batch, 0)
            return _Start(first, start_x0, concat=np.concatenate([mask_latent, masked], axis=1))

        def blend(schedule) -> sampling.StepHook:
            """Keep the picture outside the mask, noised to each next step's level (diffusers' latent blend)."""
            last = len(schedule.timesteps) - 1

            def after_step(x: np.ndarray, i: int) -> np.ndarray:
                known = x0 if i >= last else noise_at(schedule, i + 1, x0, noise_x)
                return ((1 - mask_latent) * known + mask_latent * x).astype(np.float32)
            return after_step

        return _Start(first, start_x0, after_step=blend)


@dataclass(frozen=True)
class _Start:
    """How a generation enters the sampler: at which step, from which clean latents (img2img), with which extra
    U-Net channels (an inpainting U-Net's) and which hook after each step (an ordinary model's mask blend)."""

    step: int = 0
    x0: np.ndarray | None = None  # (B, C, h, w)
    concat: np.ndarray | None = None  # (B, 1 + C, h, w): mask and masked-picture latents
    after_step: Callable | None = None  # schedule -> StepHook


def _lora_specs(loras) -> tuple[LoraSpec, ...]:
    """LoraSpec, (FILE, SCALE) pairs or "FILE:SCALE" texts -> LoraSpecs."""
    specs = []
    for item in loras or ():
        if isinstance(item, LoraSpec):
            specs.append(item)
        elif isinstance(item, (str, Path)):
            specs.append(LoraSpec.parse(str(item)))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], (int, float)):
            specs.append(LoraSpec(Path(item[0]), float(item[1])))
        else:
            raise EdgesdError(f"a LoRA must be (FILE, SCALE) or 'FILE:SCALE', got {item!r}",
                              "e.g. loras=[(\"style.safetensors\", 0.8)]")
    return tuple(specs)


def _lora_constants(folder: ModelFolder, loras: tuple[LoraSpec, ...]) -> dict[str, dict]:
    """component -> graph constant -> the LoRAs' summed delta, from each graph's weights.json."""
    if not loras:
        return {}
    maps, unavailable = {}, {}
    for component in (*folder.family.text_components, "unet"):
        weights = read_weight_map(folder.root / component)
        if weights is not None:
            maps[component] = weights
            continue
        precision = ((folder.manifest or {}).get("graphs", {}).get(component) or {}).get("precision")
        unavailable[component] = (f"its {precision} graph holds quantized weights, which a LoRA cannot be added to"
                                  if precision not in (None, "fp32", "fp16", "fp16-compute") else
                                  "the folder has no weights.json for it (written by edgesd export)")
    targets = {c: {name: t.shape for name, t in m.items()} for c, m in maps.items()}
    deltas = lora_deltas(loras, targets, folder.family.title, folder.configs.get("unet"), unavailable)
    return {c: constant_deltas(d, maps[c]) for c, d in deltas.items()}


def resolve_backend(folder: ModelFolder, backend: str) -> str:
    """"auto" -> openvino for a folder with OpenVINO IR graphs, else onnxruntime; check the folder fits."""
    formats = {name: folder.graph_format(name) for name in folder.specs if folder.has(name)}
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


def _checked(callback: ProgressCallback | None, preview: Callable[[], list[Image.Image]]
             ) -> sampling.StepCallback | None:
    """The sampler's step callback: the user's callback(step, total[, preview]); False from it cancels."""
    if callback is None:
        return None
    if not callable(callback):
        raise EdgesdError(f"callback must be a function callback(step, total), got {type(callback).__name__}")
    args = (preview,) if _takes_three(callback) else ()

    def step(i: int, n: int) -> None:
        if callback(i, n, *args) is False:
            raise Cancelled(f"cancelled after step {i} of {n}")

    return step


def _takes_three(callback: Callable) -> bool:
    """Whether a callback takes (step, total, preview) rather than (step, total)."""
    try:
        params = list(inspect.signature(callback).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the two-argument form
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


def strength_start(steps: int, strength: float) -> int:
    """The step img2img starts at for `strength` (1: from pure noise, all steps), as diffusers counts it."""
    return steps - min(int(steps * strength), steps)
