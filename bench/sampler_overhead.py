"""What a sampler step costs beside the U-Net, at 512x512 (latents (1, 4, 64, 64), guidance on).

    .venv/bin/python bench/sampler_overhead.py

Runs every sampler through the real denoiser layer (guidance batching, prediction conversion) with a
stand-in U-Net that returns a fixed array, so the time measured is all NumPy work around the network.
Compares it with the U-Net step of the latest bench/results/foundation-*.json (SD 1.5, random weights).
"""

from __future__ import annotations

import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from edgesd.denoiser import Denoiser
from edgesd.samplers import run_sampler as _run_sampler
from edgesd.schedulers import SAMPLERS, alphas_cumprod, resolve_scheduler

HERE = Path(__file__).resolve().parent
SD15_SCHEDULER = json.loads((HERE.parent.parent / "shared" / "reference-configs" / "sd15" / "scheduler" /
                             "scheduler_config.json").read_text()) if (HERE.parent.parent / "shared").exists() else {
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
    "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False}
STEPS = 20


def main() -> None:
    rng = np.random.default_rng(0)
    fixed = rng.standard_normal((2, 4, 64, 64), dtype=np.float32)  # what the stand-in "U-Net" returns
    context = rng.standard_normal((2, 77, 768), dtype=np.float32)
    results = sorted(HERE.glob("results/foundation-*.json"))
    unet_s = json.loads(results[-1].read_text())["ours"]["unet_s_per_step"] if results else None
    rows = []
    for name in SAMPLERS:
        sched = resolve_scheduler(name, SD15_SCHEDULER)
        calls = []

        def unet(sample, t, **cond):
            calls.append(1)
            return fixed[: sample.shape[0]]

        d = Denoiser(unet=unet, cond={"encoder_hidden_states": context}, guidance_scale=7.5, prediction_type="epsilon",
                     alphas_cumprod=alphas_cumprod(sched))
        start_x = rng.standard_normal((1, 4, 64, 64), dtype=np.float32)
        best = float("inf")
        for _ in range(3):
            calls.clear()
            t0 = time.perf_counter()
            _run_sampler(sched, d, start_x, STEPS, lambda shape: rng.standard_normal(shape, dtype=np.float32), None)
            best = min(best, time.perf_counter() - t0)
        per_call_ms = 1000 * best / len(calls)
        share = f"{100 * per_call_ms / 1000 / unet_s:.3f}%" if unet_s else "n/a"
        rows.append((name, len(calls), per_call_ms, share))
    lines = [f"# Sampler overhead per U-Net call, latents (1, 4, 64, 64), guidance 7.5, {STEPS} steps",
             f"# {platform.node()} {date.today()}; U-Net step for comparison: {unet_s} s "
             f"({results[-1].name if results else 'no foundation results'})",
             "| sampler | U-Net calls | NumPy ms per call | share of a U-Net step |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {c} | {ms:.2f} | {sh} |" for n, c, ms, sh in rows]
    text = "\n".join(lines) + "\n"
    (HERE / "results" / f"sampler-overhead-{platform.node()}-{date.today()}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
