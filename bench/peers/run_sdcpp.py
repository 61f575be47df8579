"""stable-diffusion.cpp through stable-diffusion-cpp-python (bench/peers/protocol.py says what is measured).
Runs in bench/venvs/sdcpp (the pip build: ggml's CPU backend compiled from source for this CPU, GGML_NATIVE).
Reads the diffusers folder directly and quantizes the weights to q8_0 while loading; variant "q8_0-flash" also
turns on flash attention in the U-Net (diffusion_flash_attn, stable-diffusion.cpp's low-memory setting).
The text encoder and VAE times are the ones stable-diffusion.cpp logs ("get_learned_condition completed",
"decode_first_stage completed").
"""

from __future__ import annotations

import ctypes
import re

import stable_diffusion_cpp as sd_cpp
from protocol import GUIDANCE, NEGATIVE, PROMPT, SEED, StepClock, Stopwatch, arguments, report
from stable_diffusion_cpp import StableDiffusion

TIMED = re.compile(r"(get_learned_condition|decode_first_stage) completed, taking ([0-9.]+)s")
logged: dict[str, float] = {}


@sd_cpp.sd_log_callback
def on_log(level: int, text: bytes, data: ctypes.c_void_p) -> None:
    if match := TIMED.search(text.decode("utf-8", errors="replace")):
        logged[match.group(1)] = float(match.group(2))


def main() -> None:
    args = arguments(variants=("q8_0", "q8_0-flash"))
    with Stopwatch() as loading:
        sd = StableDiffusion(model_path=str(args.model), wtype="q8_0", n_threads=args.threads or -1,
                             vae_decode_only=True, verbose=False, diffusion_flash_attn=args.variant.endswith("-flash"))
    sd_cpp.sd_set_log_callback(on_log, ctypes.c_void_p(0))  # after construction: it installs its own
    clock = StepClock()

    def generate(steps: int):
        return sd.generate_image(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size,
                                 cfg_scale=GUIDANCE, sample_method="euler", sample_steps=steps, seed=SEED,
                                 progress_callback=clock.tick)

    generate(1)
    if args.start_only:
        report(load_s=loading.seconds, compile_s=0.0)
        return
    clock.start()
    logged.clear()
    with Stopwatch() as total:
        generate(args.steps)
    report(load_s=loading.seconds, compile_s=0.0, text_encoder_s=logged.get("get_learned_condition"),
           unet_s_per_step=clock.per_step(), vae_decode_s=logged.get("decode_first_stage"),
           total_s=total.seconds, steps=args.steps, unet_calls=args.steps)


if __name__ == "__main__":
    main()
