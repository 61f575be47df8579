"""What each precision recipe costs in fidelity: the exporter's own report, per recipe, for one model.

    .venv/bin/python bench/recipes_fidelity.py SRC [--name edgesd-tiny] [--recipes fp16,int8-weights,int8,int4-weights]
                                               [--format onnx|openvino]

SRC is a diffusers folder or an fp32/fp16 edgesd export: the embedded model's shipped folder
(models/edgesd-tiny, fp16-stored weights) is its own reference, its training run's diffusers folder not being
kept (models/TRAINING.md). Each recipe is exported with --allow-lossy into a
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
    stem.with_suffix(".md").write_text(markdown(results, args.format, args.name, args.src, args.default_guidance))
    print(f"wrote {stem}.json and .md")


def _db(value) -> str:
    """A PSNR from the JSON report: None there means no difference at all."""
    return "identical" if value is None else str(value)


def markdown(results: dict, fmt: str, name: str, src: Path, guidance: float) -> str:
    held_out = next(iter(results.values()))["pipeline"]["prompts"]
    prompts = "; ".join(f"{i + 1}: {p}" for i, p in enumerate(held_out))
    source = (f"made from its shipped fp16 graphs widened to fp32 (`{src}`)" if (src / "edgesd.json").is_file()
              else f"exported from `{src}`")
    lines = [f"Fidelity per recipe ({fmt}) for {name} against its fp32 ONNX export, each recipe {source} "
             f"({date.today()}, `bench/recipes_fidelity.py`; identical: no difference at all). Image PSNR per held-out prompt ({prompts}), 10 steps, "
             f"guidance {guidance}.", "",
             "| recipe | text encoder (hidden states) dB | U-Net dB (cosine) | VAE decoder dB | U-Net MB (fp32) | all graphs MB | "
             "image PSNR per prompt dB | worst | threshold | passes |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for recipe, r in results.items():
        g, p = r["graphs"], r["pipeline"]
        total = sum(x["size_mb"] for k, x in g.items() if k != "text_encoder.pooler_output")  # one per graph
        text, unet, vae = g["text_encoder.last_hidden_state"], g["unet.out_sample"], g["vae_decoder.sample"]
        lines.append(f"| {recipe} | {_db(text['psnr_db'])} | {_db(unet['psnr_db'])} ({unet['cosine']}) "
                     f"| {_db(vae['psnr_db'])} | {unet['size_mb']} ({unet['fp32_size_mb']}) | "
                     f"{total:.1f} | {', '.join(_db(v) for v in p['image_psnr_db'])} | {_db(p['worst_image_psnr_db'])} | "
                     f"{p['threshold_db']} | {'yes' if p['passed'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
