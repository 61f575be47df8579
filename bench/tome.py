"""Token merging in edgesd (`edgesd tome MODEL`, then `--token-merging R`) on the SD 1.5 architecture with
RANDOM weights: the U-Net's seconds per evaluation at each merge ratio against the plain U-Net (ONNX Runtime
CPU, 512x512, Euler, guidance 7.5), each configuration in a fresh process, rounds alternating.

    .venv/bin/python bench/tome.py [--model bench/work/sd15-random-onnx] [--ratios 0,0.3,0.5] [--steps 4]

The model gets the token-merging U-Net first (once; bench/sd15_foundation.py builds and exports the fp32 model,
bench/recipes_backends.py the int8 ones). Each phase loads it, makes a 1-step warm-up picture, then one of
`steps` steps, and reports the U-Net's seconds per evaluation (ratio 0: the plain U-Net graph). Quality is
measured on the embedded model by bench/eval_adherence.py --token-merging.
Results: bench/results/tome-vm-<date>[-<name>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "work" / "sd15-random-onnx"
PROMPT = "a photograph of an astronaut riding a horse"
SIZE, GUIDANCE, SEED = 512, 7.5, 0


def phase(model: Path, ratio: float, steps: int) -> dict:
    """One ratio, in this process: the U-Net's seconds per evaluation."""
    import edgesd

    pipe = edgesd.Pipeline.load(model, cache="off")
    args = dict(guidance_scale=GUIDANCE, width=SIZE, height=SIZE, seed=SEED, scheduler="euler", token_merging=ratio)
    pipe(PROMPT, num_inference_steps=1, **args)  # warm-up
    t = pipe(PROMPT, num_inference_steps=steps, **args).timings
    graph = "unet_tome" if ratio > 0 else "unet"
    return {"ratio": ratio, "steps": steps, "total_s": t["total_s"], "unet_s": t[f"{graph}_s"],
            "unet_evaluations": t["unet_evaluations"],
            "s_per_evaluation": round(t[f"{graph}_s"] / t["unet_evaluations"], 3),
            "vae_decoder_s": t["vae_decoder_s"],
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--ratios", default="0,0.3,0.5")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default="", help="suffix of the results' file names (e.g. the recipe)")
    parser.add_argument("--phase", type=float, help=argparse.SUPPRESS)  # one ratio, in this process
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args.model, args.phase, args.steps)))
        return
    from families_scale import machine  # bench/ is on sys.path when a script of it runs
    from rounds import alternating

    from edgesd.export.tome import add_tome
    from edgesd.model import ModelFolder

    folder = ModelFolder.open(args.model)
    if not folder.has("unet_tome"):
        print("adding the token-merging U-Net:", add_tome(args.model).to_json(), flush=True)
    precision = (folder.manifest or {}).get("graphs", {}).get("unet", {}).get("precision", "?")
    rows = alternating(__file__, args.ratios.split(","), args.rounds, ["--model", str(args.model),
                                                                        "--steps", str(args.steps)])
    lines = [f"# Token merging (ToMe for SD), {date.today()}", "",
             f"`bench/tome.py --model {args.model.name}` on {machine()}. SD 1.5 architecture, RANDOM weights, "
             f"U-Net {precision}, ONNX Runtime CPU, 512x512, Euler, guidance 7.5; {args.steps}-step pictures after a "
             f"1-step warm-up, each configuration in a fresh process, {args.rounds} alternating rounds; ratio 0 "
             "is the plain U-Net graph. Merged: the self-attention of the full-resolution blocks.", "",
             "| round | ratio | picture s | U-Net s | U-Net s/evaluation | against ratio 0 | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["round"] == row["round"] and r["ratio"] == 0.0)
        row["speedup"] = round(base["s_per_evaluation"] / row["s_per_evaluation"], 3)
        lines.append(f"| {row['round']} | {row['ratio']} | {row['total_s']} | {row['unet_s']} | "
                     f"{row['s_per_evaluation']} | {row['speedup']:.2f}x | {row['peak_rss_gb']} |")
    stem = HERE / "results" / f"tome-vm-{date.today()}{'-' + args.name if args.name else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), "model": args.model.name,
                                                     "unet_precision": precision, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
