"""--memory fast against --memory low on the SD 1.5 architecture with RANDOM weights, 512x512.

    .venv/bin/python bench/memory_mode.py [--recipes onnx-int8,openvino-int8-hybrid] [--steps 4]

Each recipe folder of bench/recipes_backends.py (bench/work/recipes/<format>-<recipe>; made by it) is run by
edgesd.benchmark.measure_generation in a fresh process per mode: a 1-step warm-up picture, then the measured
picture; peak RSS is the process's VmHWM over load and both pictures. Each mode gets a new cache folder that
a first process fills (not measured: writing the optimised graphs is a first start's cost), so the measured
process loads from it, as every later start does, and "low" reloads its graphs from it. Results: bench/results/memory-mode-vm-<date>.{json,md}.
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
    parser.add_argument("--recipes", default="onnx-int8,openvino-int8-hybrid")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import recipes_backends
    from edgesd.benchmark import BenchSettings, BenchTarget, measure_in_child

    rows = []
    settings = BenchSettings(steps=args.steps, width=512, height=512, guidance=7.5)
    for name in args.recipes.split(","):
        model = HERE / "work" / "recipes" / name
        if not (model / "done").is_file():
            raise SystemExit(f"error: {model} is missing; run bench/recipes_backends.py --configs "
                             f"{name.replace('onnx-', 'onnxruntime:').replace('openvino-', 'openvino:')}")
        for memory in ("fast", "low"):
            with tempfile.TemporaryDirectory(dir=HERE / "work") as cache:
                target = BenchTarget(model, f"{name} --memory {memory}", {"memory": memory, "cache_dir": cache})
                measure_in_child(target, BenchSettings(steps=1, width=512, height=512))  # fills the cache
                row = {"recipe": name, "memory": memory, **measure_in_child(target, settings)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    today = str(date.today())
    stem = HERE / "results" / f"memory-mode-vm-{today}"
    machine = recipes_backends.machine()
    stem.with_suffix(".json").write_text(json.dumps({"date": today, "machine": machine, "steps": args.steps,
                                                     "rows": rows}, indent=2) + "\n")
    lines = [f"# --memory fast / low, SD 1.5 architecture with RANDOM weights, 512x512, {args.steps} steps", "",
             f"{today}, `bench/memory_mode.py`; {machine['cpu']}, {machine['cores']} cores "
             f"({', '.join(machine['isa'])}), {machine['ram_gb']} GB. A 1-step warm-up picture, then the "
             "measured one; peak RSS over both and the load.", "",
             "| recipe | memory | load s | measured picture s | U-Net s/step | VAE s | peak RSS GB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['memory']} | failed: {r['error']} |||||")
        else:
            lines.append(f"| {r['recipe']} | {r['memory']} | {r['load_s']} | {r['total_s']} | "
                         f"{r['unet_s_per_step']} | {r['vae_s']} | {r['peak_rss_gb']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
