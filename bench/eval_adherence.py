"""Prompt adherence of a shapes model on held-out captions, by pixel analysis.

    .venv/bin/python bench/eval_adherence.py [MODEL ...] [--pytorch DIFFUSERS_DIR] [--guidance G[,G...]]

MODEL: edgesd model folders (default: the embedded model), each scored and labelled by its
recipe; --pytorch also scores the diffusers folder they came from, with diffusers on
PyTorch. Prompts: every held-out (colour, shape, background) combination at every position,
one seed each (100 prompts). Steps and guidance default to the first model's own defaults;
several guidance values give a sweep. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgesd.models.adherence import CHANCE, held_out_prompts, score
from edgesd.models.training import shapes


def generate_edgesd(model: Path, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 10,
                    rescale: float = 0.0):
    import edgesd

    pipe = edgesd.Pipeline.load(model)
    images = []
    for i in range(0, len(prompts), batch):
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       guidance_rescale=rescale, seed=seed + i).images
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
    parser.add_argument("models", type=Path, nargs="*", help="edgesd model folders (default: the embedded model)")
    parser.add_argument("--pytorch", type=Path, help="the diffusers folder the models were exported from")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", help="guidance scale, or several separated by commas (default: the model's)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="edgesd models only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="where to write the scores")
    parser.add_argument("--save-grid", type=Path, help="write a PNG grid of the first model's first 40 pictures")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import edgesd
    from edgesd.model import ModelFolder
    from edgesd.models_path import default_model_path

    models = args.models or [default_model_path()]
    first = ModelFolder.open(models[0])
    steps = args.steps or first.defaults.num_inference_steps
    guidances = [float(g) for g in args.guidance.split(",")] if args.guidance else [first.defaults.guidance_scale]
    items = held_out_prompts()
    prompts, scenes = [p for p, _ in items], [s for _, s in items]
    results = {"prompts": len(prompts), "held_out_combos": len(shapes.held_out_combos()), "steps": steps,
               "chance": {k: round(100 * v, 1) for k, v in CHANCE.items()}, "scores": []}
    rows = [("chance", "", results["chance"])]
    for guidance in guidances:
        for folder in models:
            recipes = {g.get("precision") for g in (ModelFolder.open(folder).manifest or {}).get("graphs", {}).values()}
            label = f"edgesd onnx {'/'.join(sorted(recipes)) or 'fp32'} ({folder.name})"
            images = generate_edgesd(folder, prompts, steps, guidance, args.seed, rescale=args.guidance_rescale)
            if args.guidance_rescale:
                label += f", rescale {args.guidance_rescale}"
            rows.append((label, guidance, score(images, scenes)))
            if args.save_grid and folder == models[0] and guidance == guidances[0]:
                _save_grid(images[:40], args.save_grid)
        if args.pytorch:
            images = generate_diffusers(args.pytorch, prompts, steps, guidance, args.seed)
            rows.append(("diffusers pytorch fp32", guidance, score(images, scenes)))
    results["scores"] = [{"model": m, "guidance": g, **r} for m, g, r in rows[1:]]
    results["edgesd_version"] = edgesd.__version__
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{steps} steps, {len(prompts)} held-out prompts")
    print(f"{'':<44}{'guidance':>9}{'background':>11}{'colour':>8}{'shape':>7}{'position':>9}")
    for name, g, r in rows:
        print(f"{name:<44}{g!s:>9}{r['background']:>11}{r['color']:>8}{r['shape']:>7}{r['position']:>9}")


def _save_grid(images, path: Path) -> None:
    from PIL import Image

    side = images[0].size[0]
    grid = Image.new("RGB", (side * 10, side * ((len(images) + 9) // 10)))
    for i, image in enumerate(images):
        grid.paste(image, ((i % 10) * side, (i // 10) * side))
    grid.save(path)


if __name__ == "__main__":
    main()
