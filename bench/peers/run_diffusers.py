"""diffusers-API pipelines (bench/peers/protocol.py says what is measured), one variant per venv:

    diffusers      StableDiffusionPipeline on PyTorch CPU, fp32          (bench/venvs/diffusers)
    optimum-onnx   optimum's ORTStableDiffusionPipeline, CPU EP          (bench/venvs/optimum-onnx)
    optimum-intel  optimum-intel's OVStableDiffusionPipeline, reshaped to static 512x512 shapes, f32
                   inference precision                                  (bench/venvs/optimum-intel)
"""

from __future__ import annotations

import os

from protocol import GUIDANCE, NEGATIVE, PROMPT, SEED, StepClock, Stopwatch, arguments, report

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from diffusers import EulerDiscreteScheduler  # noqa: E402


def load(variant: str, model, cache_dir, threads, size: int):
    """The pipeline and the seconds spent compiling it (0 where nothing compiles)."""
    if threads:
        torch.set_num_threads(threads)
    if variant == "diffusers":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32), 0.0
    if variant == "optimum-onnx":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        return ORTStableDiffusionPipeline.from_pretrained(model), 0.0
    from optimum.intel import OVStableDiffusionPipeline

    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(cache_dir or "")}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    pipe = OVStableDiffusionPipeline.from_pretrained(model, compile=False, ov_config=config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    with Stopwatch() as compiled:
        pipe.compile()
    return pipe, compiled.seconds


def main() -> None:
    args = arguments(variants=("diffusers", "optimum-onnx", "optimum-intel"))
    with Stopwatch() as loading:
        pipe, compile_s = load(args.variant, args.model, args.cache_dir, args.threads, args.size)
    load_s = loading.seconds - compile_s
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    clock = StepClock()

    def on_step(_pipe, _step, _timestep, kwargs):
        clock.tick()
        return kwargs

    def latents(steps: int):
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    height=args.size, width=args.size, generator=torch.Generator().manual_seed(SEED),
                    output_type="latent", callback_on_step_end=on_step).images

    def decode(x):
        with torch.no_grad():
            image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")

    decode(latents(1))  # warm-up: first-call allocations (and nothing else compiles: shapes are static)
    if args.start_only:
        report(load_s=load_s, compile_s=compile_s)
        return
    with torch.no_grad(), Stopwatch() as text:
        pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    clock.start()
    with Stopwatch() as total:
        x = latents(args.steps)
        with Stopwatch() as vae:
            decode(x)
    report(load_s=load_s, compile_s=compile_s, text_encoder_s=text.seconds, unet_s_per_step=clock.per_step(),
           vae_decode_s=vae.seconds, total_s=total.seconds, steps=args.steps, unet_calls=args.steps)


if __name__ == "__main__":
    main()
