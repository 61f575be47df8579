"""edgesd on one backend (bench/peers/protocol.py says what is measured). Runs in the project's .venv.

A variant is a backend with, for some, load options or generation options (VARIANTS). Variants whose
generation differs from the like-for-like one (a different picture for the same seed) are the opt-in fast
rows of bench/side_by_side.py, marked "accelerated" there.
"""

from __future__ import annotations

from protocol import GUIDANCE, NEGATIVE, PROMPT, SCHEDULER, SEED, StepClock, Stopwatch, arguments, report

from edgesd import Pipeline

# variant -> (Pipeline.load options, extra generation arguments)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "onnxruntime": ({"backend": "onnxruntime"}, {}),
    "openvino": ({"backend": "openvino"}, {}),
    # one component in memory at a time (--memory low)
    "onnxruntime-low-memory": ({"backend": "onnxruntime", "memory": "low"}, {}),
    "openvino-low-memory": ({"backend": "openvino", "memory": "low"}, {}),
    # opt-in, not equal to the rows above: bf16 arithmetic where the CPU has it; guidance for half the steps
    "openvino-bf16": ({"backend": "openvino", "ov_precision": "bf16"}, {}),
    "onnxruntime-guidance-cutoff-0.5": ({"backend": "onnxruntime"}, {"guidance_cutoff": 0.5}),
    "openvino-bf16-guidance-cutoff-0.5": ({"backend": "openvino", "ov_precision": "bf16"}, {"guidance_cutoff": 0.5}),
    # DeepCache: the whole U-Net every 2nd step (the model folder has `edgesd deepcache`'s graphs)
    "onnxruntime-deepcache-2": ({"backend": "onnxruntime"}, {"deepcache_interval": 2}),
    # ToMe: half the full-resolution tokens merged in each self-attention (the folder has `edgesd tome`'s graph)
    "onnxruntime-tome-0.5": ({"backend": "onnxruntime"}, {"token_merging": 0.5}),
}


def main() -> None:
    args = arguments(variants=tuple(VARIANTS))
    load_options, generation = VARIANTS[args.variant]
    with Stopwatch() as load:
        pipe = Pipeline.load(args.model, threads=args.threads, cache_dir=args.cache_dir, **load_options)
    clock = StepClock()

    def generate(steps: int):
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    width=args.size, height=args.size, seed=SEED, scheduler=SCHEDULER, callback=clock.tick,
                    **generation)

    warm = generate(1)  # OpenVINO compiles here, for the static shapes of this size
    compile_s = warm.timings.get("compile_s", 0.0)
    if args.start_only:
        report(load_s=load.seconds, compile_s=compile_s)
        return
    clock.start()
    with Stopwatch() as total:
        result = generate(args.steps)
    t = result.timings
    # with a guidance cutoff or DeepCache the steps differ (batch 2, then 1; whole or shallow U-Net): the mean
    # U-Net evaluation, not the median step, is the figure (without OpenVINO's recompiling, which total_s keeps)
    mixed = bool({"guidance_cutoff", "deepcache_interval", "token_merging"} & set(generation))
    unet_s = t.get("unet_s", 0.0) + t.get("unet_shallow_s", 0.0) + t.get("unet_tome_s", 0.0) - t.get("compile_s", 0.0)
    per_step = unet_s / t["unet_evaluations"] if mixed else clock.per_step()
    report(load_s=load.seconds, compile_s=compile_s, text_encoder_s=t["text_encoder_s"],
           unet_s_per_step=per_step, vae_decode_s=t["vae_decoder_s"], total_s=total.seconds,
           steps=args.steps, unet_calls=t["unet_evaluations"])


if __name__ == "__main__":
    main()
