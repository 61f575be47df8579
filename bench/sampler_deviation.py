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

from tests.test_schedulers import NAMES, SD, SPACINGS, _both_loops  # noqa: E402

import diffusers  # noqa: E402
from edgesd.schedulers import SAMPLERS  # noqa: E402

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
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
