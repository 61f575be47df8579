"""U-Net cost per precision recipe on the SD 1.5 architecture with RANDOM weights (ONNX Runtime CPU).

    .venv/bin/python bench/recipes_unet.py [--recipes fp32,fp16,int8-weights,int4-weights] [--runs 2]

Needs the fp32 export made by `bench/sd15_foundation.py` (bench/work/sd15-random-onnx). For each recipe the
U-Net is written from that fp32 graph with the exporter's own `write_recipe` (bench/work/recipes/), then, in
a fresh process: session load time, seconds per U-Net step (batch 2 = classifier-free guidance, 512 x 512,
the median of --runs after one warm-up call), peak RSS and size on disk. Static int8 needs calibration inputs
from pipeline runs and is not measured here yet. Results: bench/results/recipes-unet-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
FP32 = HERE / "work" / "sd15-random-onnx" / "unet" / "model.onnx"
WORK = HERE / "work" / "recipes"


def measure(path: Path, runs: int) -> dict:
    import numpy as np

    from edgesd.backends import RuntimeOptions, load_graph
    from edgesd.graphs import GRAPHS

    start = time.perf_counter()
    graph = load_graph(path, GRAPHS["unet"], RuntimeOptions(backend="onnxruntime"))
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    graph.run(feeds)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        graph.run(feeds)
        times.append(time.perf_counter() - start)
    return {"load_s": round(load_s, 2), "unet_s_per_step": round(float(np.median(times)), 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fp32,fp16,int8-weights,int4-weights")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.runs)))
        return
    if not FP32.is_file():
        sys.exit(f"error: {FP32} is missing; run bench/sd15_foundation.py --phase build and --phase export first")
    from edgesd.export.recipes import write_recipe

    rows = []
    for recipe in args.recipes.split(","):
        path = FP32 if recipe == "fp32" else WORK / recipe / "unet" / "model.onnx"
        if recipe != "fp32" and not path.is_file():
            start = time.perf_counter()
            write_recipe(FP32, path, recipe)
            print(f"{recipe}: written in {time.perf_counter() - start:.0f} s", flush=True)
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model.onnx"))
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--runs", str(args.runs)],
                             capture_output=True, text=True, check=True)
        row = {"recipe": recipe, "size_gb": round(size / 1e9, 3), **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(row, flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version()}
    import onnxruntime

    result = {"date": str(date.today()), "machine": machine, "onnxruntime": onnxruntime.__version__,
              "weights": "random (SD 1.5 architecture)", "batch": 2, "size": 512, "rows": rows}
    stem = HERE / "results" / f"recipes-unet-vm-{date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"U-Net per recipe, SD 1.5 architecture with RANDOM weights, batch 2, 512x512, ONNX Runtime "
             f"{onnxruntime.__version__} CPU, {os.cpu_count()} cores ({date.today()}; `bench/recipes_unet.py`).", "",
             "| recipe | size on disk GB | session load s | U-Net s/step | peak RSS GB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['size_gb']} | {r['load_s']} | {r['unet_s_per_step']} | {r['peak_rss_gb']} |"
              for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
