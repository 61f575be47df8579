"""What each precision recipe costs in fidelity: the exporter's own report, per recipe, for one model.

    .venv/bin/python bench/recipes_fidelity.py SRC [--name edgesd-tiny] [--recipes fp16,int8-weights,int8,int4-weights]

SRC is a diffusers folder (the embedded model's is training run 4's `diffusers/` folder, made by
`models/training/train.py`; see models/TRAINING.md). Each recipe is exported with --allow-lossy into a
temporary folder; the fidelity report (per graph PSNR / cosine / size against the fp32 trace, image PSNR per
held-out prompt, 10 steps) goes to bench/results/recipes-fidelity-<name>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("--name", default="edgesd-tiny")
    parser.add_argument("--recipes", default="fp16,int8-weights,int8,int4-weights")
    args = parser.parse_args()
    from edgesd.export import ExportOptions, export_model
    from edgesd.export.fidelity import FIDELITY_PROMPTS

    results = {}
    with tempfile.TemporaryDirectory() as work:
        for recipe in args.recipes.split(","):
            report = export_model(args.src, Path(work) / recipe, ExportOptions(recipe=recipe, allow_lossy=True))
            results[recipe] = {**report.fidelity.to_json(), "export_s": round(report.seconds, 1)}
            print(recipe, results[recipe]["pipeline"]["image_psnr_db"], flush=True)
    stem = HERE / "results" / f"recipes-fidelity-{args.name}-{date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    prompts = "; ".join(f"{i + 1}: {p}" for i, p in enumerate(FIDELITY_PROMPTS))
    lines = [f"Fidelity per recipe for {args.name} against its fp32 export ({date.today()}, "
             f"`bench/recipes_fidelity.py`). Image PSNR per held-out prompt ({prompts}), 10 steps.", "",
             "| recipe | text encoder dB | U-Net dB (cosine) | VAE decoder dB | U-Net MB (fp32) | all graphs MB | "
             "image PSNR per prompt dB | worst | threshold | passes |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for recipe, r in results.items():
        g, p = r["graphs"], r["pipeline"]
        total = sum(x["size_mb"] for x in g.values())
        lines.append(f"| {recipe} | {g['text_encoder']['psnr_db']} | {g['unet']['psnr_db']} ({g['unet']['cosine']}) "
                     f"| {g['vae_decoder']['psnr_db']} | {g['unet']['size_mb']} ({g['unet']['fp32_size_mb']}) | "
                     f"{total:.1f} | {', '.join(str(v) for v in p['image_psnr_db'])} | {p['worst_image_psnr_db']} | "
                     f"{p['threshold_db']} | {'yes' if p['passed'] else 'no'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
