"""What each precision recipe costs in fidelity: the exporter's own report, per recipe, for one model.

    .venv/bin/python bench/recipes_fidelity.py SRC [--name edgesd-tiny] [--recipes fp16,int8-weights,int8,int4-weights]
                                               [--format onnx|openvino]

SRC is a diffusers folder (the embedded model's is training run 4's `diffusers/` folder, made by
`models/training/train.py`; see models/TRAINING.md). Each recipe is exported with --allow-lossy into a
temporary folder; the fidelity report (per graph PSNR / cosine / size against the fp32 trace, image PSNR per
held-out prompt, 10 steps, at the model's own guidance) goes to
bench/results/recipes-fidelity-<name>[-openvino]-<date>.{json,md}.
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
    parser.add_argument("--recipes", default=None, help="default: every recipe the format can write but fp32")
    parser.add_argument("--format", default="onnx", choices=["onnx", "openvino"])
    parser.add_argument("--default-guidance", type=float, default=1.5,
                        help="the model's own guidance, used by the fidelity runs (the embedded model's: 1.5)")
    args = parser.parse_args()
    from edgesd.export import ExportOptions, export_model
    from edgesd.model import GenerationDefaults
    from edgesd.export.fidelity import FIDELITY_PROMPTS
    from edgesd.export.recipes import FORMAT_RECIPES

    recipes = args.recipes.split(",") if args.recipes else [r for r in FORMAT_RECIPES[args.format] if r != "fp32"]
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for recipe in recipes:
            report = export_model(args.src, Path(work) / recipe, ExportOptions(
                recipe=recipe, format=args.format, allow_lossy=True,
                defaults=GenerationDefaults(20, args.default_guidance)))
            results[recipe] = {**report.fidelity.to_json(), "export_s": round(report.seconds, 1)}
            print(recipe, results[recipe]["pipeline"]["image_psnr_db"], flush=True)
    suffix = "" if args.format == "onnx" else f"-{args.format}"
    stem = HERE / "results" / f"recipes-fidelity-{args.name}{suffix}-{date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    prompts = "; ".join(f"{i + 1}: {p}" for i, p in enumerate(FIDELITY_PROMPTS))
    lines = [f"Fidelity per recipe ({args.format}) for {args.name} against its fp32 ONNX export ({date.today()}, "
             f"`bench/recipes_fidelity.py`). Image PSNR per held-out prompt ({prompts}), 10 steps, "
             f"guidance {args.default_guidance}.", "",
             "| recipe | text encoder (hidden states) dB | U-Net dB (cosine) | VAE decoder dB | U-Net MB (fp32) | all graphs MB | "
             "image PSNR per prompt dB | worst | threshold | passes |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for recipe, r in results.items():
        g, p = r["graphs"], r["pipeline"]
        total = sum(x["size_mb"] for k, x in g.items() if k != "text_encoder.pooler_output")  # one per graph
        text, unet, vae = g["text_encoder.last_hidden_state"], g["unet.out_sample"], g["vae_decoder.sample"]
        lines.append(f"| {recipe} | {text['psnr_db']} | {unet['psnr_db']} ({unet['cosine']}) "
                     f"| {vae['psnr_db']} | {unet['size_mb']} ({unet['fp32_size_mb']}) | "
                     f"{total:.1f} | {', '.join(str(v) for v in p['image_psnr_db'])} | {p['worst_image_psnr_db']} | "
                     f"{p['threshold_db']} | {'yes' if p['passed'] else 'no'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
