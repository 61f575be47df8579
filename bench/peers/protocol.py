"""What every runner in bench/peers measures, and how (standard library only: runners live in other venvs).

A runner is started in a fresh process by bench/side_by_side.py, in its peer's venv:

    <venv>/bin/python bench/peers/run_<peer>.py --model DIR --steps 20 [--variant V] [--cache-dir D] [--start-only]

(--size and --threads exist for smoke tests and scaling runs)

and prints one line `RESULT {json}` holding these figures (seconds unless named otherwise):
    load_s          constructing the pipeline from the folder (reading the graphs/weights, sessions)
    compile_s       compiling for the run's static shapes, where the runtime does that (else 0)
    text_encoder_s  encoding the prompt and the negative prompt (classifier-free guidance needs both)
    unet_s_per_step median time of one denoising step (the U-Net on batch 2 plus the scheduler update),
                    from the intervals between the runtime's own per-step callbacks
    vae_decode_s    decoding the final latents to one 512x512 image
    total_s         one whole generation of --steps steps, prompt to image, after a warm-up generation
    peak_rss_gb     the process's peak resident memory (VmHWM), load and both generations included
With --start-only a runner loads, compiles and makes a 1-step generation (so lazy compilers compile), and
reports load_s and compile_s: run twice with the same --cache-dir this gives the cold and the warm start.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = ""
SIZE, GUIDANCE, SEED = 512, 7.5, 0
SCHEDULER = "euler"  # Euler discrete for every runner: one U-Net call per step everywhere


def arguments(variants: tuple[str, ...] = ("default",)) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=SIZE, help="image side (the benchmark: 512; smaller for smoke tests)")
    p.add_argument("--variant", choices=variants, default=variants[0])
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's own choice)")
    p.add_argument("--start-only", action="store_true")
    return p.parse_args()


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 2)
    return float("nan")


class StepClock:
    """Records the time of each per-step callback; the median interval is one step."""

    def __init__(self):
        self.times: list[float] = []

    def tick(self, *_args, **_kwargs):
        self.times.append(time.perf_counter())

    def start(self):
        self.times = [time.perf_counter()]

    def per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        # the first interval also holds the text encoder and set-up: drop it when there are others
        return statistics.median(gaps[1:] or gaps) if gaps else float("nan")


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def report(**figures) -> None:
    figures["peak_rss_gb"] = peak_rss_gb()
    rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}
    print("RESULT " + json.dumps(rounded), flush=True)
