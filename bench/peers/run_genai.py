"""OpenVINO GenAI's Text2ImagePipeline on an optimum-intel IR folder (bench/peers/protocol.py says what is
measured). Runs in bench/venvs/openvino-genai. Static shapes (reshape to 512x512, guidance 7.5), latency
hint, Euler discrete scheduler; variant "default": f32 inference precision (like for like), "bf16": OpenVINO's
own default on a CPU with bf16 (what a user of OpenVINO GenAI gets there without asking).
"""

from __future__ import annotations

import openvino_genai as genai
from protocol import GUIDANCE, NEGATIVE, PROMPT, SEED, StepClock, Stopwatch, arguments, report


def main() -> None:
    args = arguments(variants=("default", "bf16"))
    with Stopwatch() as loading:
        pipe = genai.Text2ImagePipeline(args.model)
    pipe.set_scheduler(genai.Scheduler.from_config(args.model / "scheduler" / "scheduler_config.json",
                                                   genai.Scheduler.Type.EULER_DISCRETE))
    pipe.reshape(1, args.size, args.size, GUIDANCE)
    config = {"INFERENCE_PRECISION_HINT": "f32" if args.variant == "default" else "bf16", "PERFORMANCE_HINT": "LATENCY",
              "CACHE_DIR": str(args.cache_dir or "")}
    if args.threads:
        config["INFERENCE_NUM_THREADS"] = args.threads
    with Stopwatch() as compiled:
        pipe.compile("CPU", **config)
    clock = StepClock()

    def on_step(step, num_steps, latent):
        clock.tick()
        return False  # False: go on

    def generate(steps: int):
        return pipe.generate(PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size,
                             guidance_scale=GUIDANCE, num_inference_steps=steps, rng_seed=SEED, callback=on_step)

    generate(1)  # warm-up: first-call allocations
    if args.start_only:
        report(load_s=loading.seconds, compile_s=compiled.seconds)
        return
    clock.start()
    with Stopwatch() as total:
        generate(args.steps)
    metrics = pipe.get_performance_metrics()
    text_ms = sum(metrics.get_text_encoder_infer_duration().values())
    report(load_s=loading.seconds, compile_s=compiled.seconds, text_encoder_s=text_ms / 1000,
           unet_s_per_step=clock.per_step(), vae_decode_s=metrics.get_vae_decoder_infer_duration() / 1000,
           total_s=total.seconds, steps=args.steps, unet_calls=args.steps)


if __name__ == "__main__":
    main()
