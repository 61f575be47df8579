"""Prompt adherence of a shapes model on held-out captions, by pixel analysis.

    .venv/bin/python bench/eval_adherence.py MODEL [--pytorch DIFFUSERS_DIR] [--steps 20] [--guidance 7.5]

MODEL is an edgesd model folder (the ONNX export); --pytorch also scores the diffusers
folder it came from, with diffusers on PyTorch. Prompts: every held-out (colour,
shape, background) combination at every position, one seed each. Prints a table
and writes JSON next to the model (or to --json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgesd.models.adherence import CHANCE, held_out_prompts, score
from edgesd.models.training import shapes


def generate_edgesd(model: Path, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 10):
    import edgesd

    pipe = edgesd.Pipeline.load(model)
    images = []
    for i in range(0, len(prompts), batch):
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       seed=seed + i).images
    return images


def generate_diffusers(folder: Path, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 10):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), batch):
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(seed + i)).images
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?", help="edgesd model folder (default: the embedded model)")
    parser.add_argument("--pytorch", type=Path, help="the diffusers folder the model was exported from")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="where to write the scores")
    parser.add_argument("--save-grid", type=Path, help="write a PNG grid of the first 40 pictures")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model is None:
        from edgesd.models_path import default_model_path

        args.model = default_model_path()
    items = held_out_prompts()
    prompts, scenes = [p for p, _ in items], [s for _, s in items]
    results = {"prompts": len(prompts), "held_out_combos": len(shapes.held_out_combos()), "steps": args.steps,
               "guidance": args.guidance, "chance": {k: round(100 * v, 1) for k, v in CHANCE.items()}}
    images = generate_edgesd(args.model, prompts, args.steps, args.guidance, args.seed)
    results["edgesd_onnx_fp32"] = score(images, scenes)
    if args.save_grid:
        from PIL import Image

        side = images[0].size[0]
        grid = Image.new("RGB", (side * 10, side * 4))
        for i, image in enumerate(images[:40]):
            grid.paste(image, ((i % 10) * side, (i // 10) * side))
        grid.save(args.save_grid)
    if args.pytorch:
        results["pytorch_fp32"] = score(generate_diffusers(args.pytorch, prompts, args.steps, args.guidance,
                                                           args.seed), scenes)
    target = args.json or (args.model / "adherence.json")
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':<20}{'background':>11}{'colour':>8}{'shape':>7}{'position':>9}")
    for name in ("chance", "pytorch_fp32", "edgesd_onnx_fp32"):
        if name in results:
            r = results[name]
            print(f"{name:<20}{r['background']:>11}{r['color']:>8}{r['shape']:>7}{r['position']:>9}")


if __name__ == "__main__":
    main()
