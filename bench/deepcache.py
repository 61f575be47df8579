"""DeepCache in edgesd (`edgesd deepcache MODEL`, then `--deepcache-interval N`) on the SD 1.5 architecture with
RANDOM weights: the U-Net's cost with the whole U-Net every N-th evaluation against every one (ONNX Runtime
CPU, 512x512, Euler, guidance 7.5), each configuration in a fresh process, rounds alternating.

    .venv/bin/python bench/deepcache.py [--model bench/work/sd15-random-onnx] [--intervals 1,2,3] [--steps 6]

The model gets DeepCache's graphs first (once; bench/sd15_foundation.py builds and exports it). Each phase loads
it, makes a 1-step warm-up picture, then one of `steps` steps; from its result.timings come the whole and the
shallow U-Net's seconds per call, and from those what the U-Net of a 20-step picture costs at each interval
(the whole U-Net on every N-th of 20 evaluations), marked as worked out. Quality is measured on the embedded
model by bench/eval_adherence.py --deepcache-interval (adherence and PSNR against interval 1).
Results: bench/results/deepcache-vm-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "work" / "sd15-random-onnx"
PROMPT = "a photograph of an astronaut riding a horse"
SIZE, GUIDANCE, SEED, PICTURE_STEPS = 512, 7.5, 0, 20


def phase(model: Path, interval: int, steps: int) -> dict:
    """One configuration, in this process: the U-Net's seconds per call, whole and shallow."""
    import edgesd

    pipe = edgesd.Pipeline.load(model, cache="off")
    args = dict(guidance_scale=GUIDANCE, width=SIZE, height=SIZE, seed=SEED, scheduler="euler",
                deepcache_interval=interval)
    pipe(PROMPT, num_inference_steps=1, **args)  # warm-up
    t = pipe(PROMPT, num_inference_steps=steps, **args).timings
    shallow_calls = t.get("unet_shallow_calls", 0)
    return {"interval": interval, "steps": steps, "total_s": t["total_s"], "unet_s": t["unet_s"],
            "unet_calls": t["unet_calls"], "unet_evaluations": t["unet_evaluations"],
            "full_s_per_call": round(t["unet_s"] / t["unet_calls"], 3),
            "shallow_s_per_call": round(t["unet_shallow_s"] / shallow_calls, 3) if shallow_calls else None,
            "shallow_calls": shallow_calls, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def picture_unet_s(row: dict) -> float:
    """The U-Net seconds of a 20-step picture at the row's interval, from its seconds per call."""
    calls_per_evaluation = (row["unet_calls"] + row["shallow_calls"]) / row["unet_evaluations"]
    full = math.ceil(PICTURE_STEPS / row["interval"])  # evaluations 0, N, 2N, ...
    shallow = row["shallow_s_per_call"] or 0.0
    return calls_per_evaluation * (full * row["full_s_per_call"] + (PICTURE_STEPS - full) * shallow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--intervals", default="1,2,3")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phase", type=int, help=argparse.SUPPRESS)  # one interval, in this process
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args.model, args.phase, args.steps)))
        return
    from families_scale import machine  # bench/ is on sys.path when a script of it runs
    from rounds import alternating

    from edgesd.export.deepcache import add_deepcache
    from edgesd.model import ModelFolder

    if not ModelFolder.open(args.model).has("unet_shallow"):
        print("adding DeepCache's graphs:", add_deepcache(args.model).to_json(), flush=True)
    intervals = args.intervals.split(",")
    rows = alternating(__file__, intervals, args.rounds, ["--model", str(args.model), "--steps", str(args.steps)])
    lines = [f"# DeepCache, {date.today()}", "",
             f"`bench/deepcache.py` on {machine()}. SD 1.5 architecture, RANDOM weights, fp32, ONNX Runtime CPU, "
             f"512x512, Euler, guidance 7.5; {args.steps}-step pictures, each configuration in a fresh process, "
             f"{args.rounds} alternating rounds. The 20-step U-Net column is worked out from the seconds per call "
             "(the whole U-Net on every N-th of 20 evaluations).", "",
             "| round | interval N | steps s | U-Net s | whole s/call | shallow s/call | 20-step U-Net s (worked out) "
             "| against N = 1 | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = picture_unet_s(next(r for r in rows if r["round"] == row["round"] and r["interval"] == 1))
        unet20 = picture_unet_s(row)
        row["picture_unet_s_worked_out"] = round(unet20, 1)
        lines.append(f"| {row['round']} | {row['interval']} | {row['total_s']} | {row['unet_s']} | "
                     f"{row['full_s_per_call']} | {row['shallow_s_per_call'] or '-'} | {unet20:.1f} | "
                     f"{base / unet20:.2f}x | {row['peak_rss_gb']} |")
    stem = HERE / "results" / f"deepcache-vm-{date.today()}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
