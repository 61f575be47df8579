"""How far each edgesd sampler is from diffusers', over every combination diffusers accepts.

    .venv/bin/python bench/sampler_deviation.py [--out bench/results/sampler-deviation.md]

For each short name: timestep spacing x prediction type x {1, 2, 4, 20, 50} steps, the whole sampling
loop with the tests' deterministic stand-in model and the same injected noise (tests/test_schedulers.py's
harness); reports the largest deviation, max |ours - diffusers| / max |diffusers|, and the combinations
diffusers refuses (it raises) or breaks (non-finite output). Needs the dev extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_schedulers import NAMES, SD, SPACINGS, _both_loops, _dpmpp_2s_ancestral_reference  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
from edgesd.samplers import run_sampler as _run_sampler  # noqa: E402
from edgesd.schedulers import SAMPLERS, resolve_scheduler  # noqa: E402
from tests.test_schedulers import stand_in_denoiser  # noqa: E402

STEPS = [1, 2, 4, 20, 50]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def measure(name: str) -> dict:
    worst, runs, refused, broken = 0.0, 0, set(), set()
    for spacing in SPACINGS:
        for prediction in PREDICTIONS:
            if name == "pndm" and prediction == "v_prediction":
                # diffusers' PLMS combines raw v outputs across steps before converting them; we convert each
                # to a noise estimate first: a different (and consistent) method, so not compared
                refused.add("v_prediction: differs by design (raw v combined across steps)")
                continue
            for steps in STEPS:
                config = {**SD, "timestep_spacing": spacing, "prediction_type": prediction}
                try:
                    got, expected, _ = _both_loops(name, config, steps, prediction)
                except Exception as e:  # noqa: BLE001 - diffusers refusing the combination
                    refused.add(f"{prediction}: {type(e).__name__}")
                    continue
                if not np.isfinite(expected).all():
                    broken.add(f"{prediction}, {spacing}, {steps} steps")
                    continue
                worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
                runs += 1
    return {"runs": runs, "max_rel": worst, "refused": sorted(refused), "broken": sorted(broken)}


def measure_without_diffusers_class(name: str) -> dict:
    """DPM++ 2S a: against the tests' independent float64 reference loop (on diffusers' Euler sigmas)."""
    worst, runs = 0.0, 0
    start = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    for spacing in SPACINGS:
        for prediction in PREDICTIONS:
            for steps in STEPS:
                config = {**SD, "timestep_spacing": spacing, "prediction_type": prediction,
                          "use_karras_sigmas": name.endswith("karras")}
                gen = torch.Generator().manual_seed(1)
                expected = _dpmpp_2s_ancestral_reference(
                    config, steps, prediction, start, lambda s: torch.randn(s, generator=gen).numpy().astype(float))
                sched = resolve_scheduler(name, config)
                denoiser = stand_in_denoiser(sched, prediction)
                gen2 = torch.Generator().manual_seed(1)
                got = _run_sampler(sched, denoiser, start, steps, lambda s: torch.randn(s, generator=gen2).numpy(),
                                   None)
                worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
                runs += 1
    return {"runs": runs, "max_rel": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampler-deviation.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    lines = [f"Sampler deviation from diffusers {diffusers.__version__} (`bench/sampler_deviation.py`): whole loops "
             "with the tests' stand-in model and the same noise, spacings leading/linspace/trailing x "
             "predictions epsilon/v/sample x 1, 2, 4, 20, 50 steps.", "",
             "| sampler | diffusers class | options | loops compared | max relative deviation | diffusers refuses |",
             "|---|---|---|---:|---:|---|"]
    for name in NAMES:
        cls, forced, _ = SAMPLERS[name]
        r = measure(name)
        options = ", ".join(f"{k}={v}" for k, v in forced.items()) or "defaults"
        refuses = "; ".join(r["refused"] + [f"NaN: {b}" for b in r["broken"]]) or "none"
        lines.append(f"| {name} | {cls} | {options} | {r['runs']} | {r['max_rel']:.1e} | {refuses} |")
        print(lines[-1], flush=True)
    for name in ("dpm++2s-a", "dpm++2s-a-karras"):
        cls, forced, _ = SAMPLERS[name]
        r = measure_without_diffusers_class(name)
        options = ", ".join(f"{k}={v}" for k, v in forced.items()) or "defaults"
        lines.append(f"| {name} | none (DPM++ 2S a on {cls}'s sigmas; vs the tests' independent float64 reference) "
                     f"| {options} | {r['runs']} | {r['max_rel']:.1e} | (no class) |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
