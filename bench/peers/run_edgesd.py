"""edgesd on one backend (bench/peers/protocol.py says what is measured). Runs in the project's .venv."""

from __future__ import annotations

from protocol import GUIDANCE, NEGATIVE, PROMPT, SCHEDULER, SEED, StepClock, Stopwatch, arguments, report

from edgesd import Pipeline


def main() -> None:
    args = arguments(variants=("onnxruntime", "openvino"))
    with Stopwatch() as load:
        pipe = Pipeline.load(args.model, backend=args.variant, threads=args.threads, cache_dir=args.cache_dir)
    clock = StepClock()

    def generate(steps: int):
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    width=args.size, height=args.size, seed=SEED, scheduler=SCHEDULER, callback=clock.tick)

    warm = generate(1)  # OpenVINO compiles here, for the static shapes of this size
    compile_s = warm.timings.get("compile_s", 0.0)
    if args.start_only:
        report(load_s=load.seconds, compile_s=compile_s)
        return
    clock.start()
    with Stopwatch() as total:
        result = generate(args.steps)
    t = result.timings
    report(load_s=load.seconds, compile_s=compile_s, text_encoder_s=t["text_encoder_s"],
           unet_s_per_step=clock.per_step(), vae_decode_s=t["vae_decoder_s"], total_s=total.seconds,
           steps=args.steps, unet_calls=t["unet_calls"])


if __name__ == "__main__":
    main()
