"""Prompt adherence of a shapes model on held-out captions, by pixel analysis.

    .venv/bin/python bench/eval_adherence.py [MODEL ...] [--pytorch DIFFUSERS_DIR] [--guidance G[,G...]]
        [--guidance-cutoff C[,C...]] [--deepcache-interval N[,N...]] [--token-merging R[,R...]]
        [--backend openvino --ov-precision bf16]

MODEL: edgesd model folders (default: the embedded model), each scored and labelled by its
recipe; --pytorch also scores the diffusers folder they came from, with diffusers on
PyTorch. Prompts: every held-out (colour, shape, background) combination at every position,
one seed each (100 prompts). Steps and guidance default to the first model's own defaults;
several guidance values give a sweep. Each --guidance-cutoff below 1, --deepcache-interval above 1 and
--token-merging above 0 (opt-in speed-ups; DeepCache and token merging need a model with `edgesd deepcache`'s
or `edgesd tome`'s graphs) is also scored against the same model's
pictures without it (PSNR per picture: mean and worst); so is a --backend /
--ov-precision other than the default, against onnxruntime's. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgesd.models.adherence import CHANCE, held_out_prompts, score
from edgesd.models.training import shapes


def generate_edgesd(model: Path, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 10,
                    rescale: float = 0.0, cutoff: float = 1.0, deepcache: int = 1, merging: float = 0.0,
                    **load_options):
    import edgesd

    pipe = edgesd.Pipeline.load(model, **load_options)
    images = []
    for i in range(0, len(prompts), batch):
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       guidance_rescale=rescale, guidance_cutoff=cutoff, deepcache_interval=deepcache,
                       token_merging=merging,
                       seed=seed + i).images
    return images


def psnr_against(reference: list, images: list) -> dict:
    """Per-picture PSNR (dB, peak max |reference| as in the fidelity gate) of `images` against `reference`."""
    import numpy as np

    from edgesd.export.parity import psnr

    values = [psnr(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(reference, images)]
    return {"psnr_mean_db": round(float(np.mean(values)), 1), "psnr_worst_db": round(float(np.min(values)), 1)}


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
    parser.add_argument("--guidance-cutoff", default="1",
                        help="share of the steps that are guided, or several separated by commas (edgesd only)")
    parser.add_argument("--deepcache-interval", default="1",
                        help="DeepCache interval, or several separated by commas (edgesd models with `edgesd "
                             "deepcache`'s graphs)")
    parser.add_argument("--token-merging", default="0",
                        help="token-merging ratio, or several separated by commas (edgesd models with `edgesd "
                             "tome`'s graph)")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"))
    parser.add_argument("--ov-precision", default="f32", help="openvino: inference precision (f32, bf16, ...)")
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
    variants = [(float(c), int(n), float(m)) for c in args.guidance_cutoff.split(",")
                for n in args.deepcache_interval.split(",") for m in args.token_merging.split(",")]
    load = {"backend": args.backend, **({"ov_precision": args.ov_precision} if args.backend == "openvino" else {})}
    for guidance in guidances:
        for folder in models:
            recipes = {g.get("precision") for g in (ModelFolder.open(folder).manifest or {}).get("graphs", {}).values()}
            label = f"edgesd {args.backend} {'/'.join(sorted(recipes)) or 'fp32'} ({folder.name})"
            if args.backend == "openvino":
                label += f" {args.ov_precision}"
            # the like-for-like pictures: cutoff 1 on onnxruntime; what an opt-in changes is measured against them
            reference = generate_edgesd(folder, prompts, steps, guidance, args.seed, rescale=args.guidance_rescale)
            for cutoff, interval, merging in variants:
                images = generate_edgesd(folder, prompts, steps, guidance, args.seed, rescale=args.guidance_rescale,
                                         cutoff=cutoff, deepcache=interval, merging=merging, **load)
                name = label + (f", rescale {args.guidance_rescale}" if args.guidance_rescale else "") \
                    + (f", cutoff {cutoff}" if cutoff != 1.0 else "") \
                    + (f", deepcache {interval}" if interval != 1 else "") \
                    + (f", token merging {merging}" if merging else "")
                scores = score(images, scenes)
                if cutoff != 1.0 or interval != 1 or merging or args.backend != "onnxruntime":
                    scores.update(psnr_against(reference, images))
                rows.append((name, guidance, scores))
            if args.save_grid and folder == models[0] and guidance == guidances[0]:
                _save_grid(reference[:40], args.save_grid)
        if args.pytorch:
            images = generate_diffusers(args.pytorch, prompts, steps, guidance, args.seed)
            rows.append(("diffusers pytorch fp32", guidance, score(images, scenes)))
    results["scores"] = [{"model": m, "guidance": g, **r} for m, g, r in rows[1:]]
    results["edgesd_version"] = edgesd.__version__
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{steps} steps, {len(prompts)} held-out prompts")
    print(f"{'':<60}{'guidance':>9}{'background':>11}{'colour':>8}{'shape':>7}{'position':>9}{'PSNR mean/worst':>17}")
    for name, g, r in rows:
        versus = f"{r['psnr_mean_db']}/{r['psnr_worst_db']}" if "psnr_mean_db" in r else ""
        print(f"{name:<60}{g!s:>9}{r['background']:>11}{r['color']:>8}{r['shape']:>7}{r['position']:>9}{versus:>17}")


def _save_grid(images, path: Path) -> None:
    from PIL import Image

    side = images[0].size[0]
    grid = Image.new("RGB", (side * 10, side * ((len(images) + 9) // 10)))
    for i, image in enumerate(images):
        grid.paste(image, ((i % 10) * side, (i // 10) * side))
    grid.save(path)


if __name__ == "__main__":
    main()
