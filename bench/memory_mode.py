"""--memory fast against --memory low, and --guidance-batch joint against split, on the SD 1.5 architecture
with RANDOM weights, 512x512.

    .venv/bin/python bench/memory_mode.py [--recipes onnx-int8,openvino-int8-hybrid] [--steps 4]
        [--memory fast,low] [--guidance-batch joint,split] [--rounds 1]

Each recipe folder of bench/recipes_backends.py (bench/work/recipes/<format>-<recipe>; made by it) is run by
edgesd.benchmark.measure_generation in a fresh process per mode: a 1-step warm-up picture, then the measured
picture; peak RSS is the process's VmHWM over load and both pictures. With --rounds N every configuration runs
N times, the rounds one after another (so a drift of the machine's speed touches each alike); the row is the
median round by U-Net s/step. Each mode gets a new cache folder that
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
    parser.add_argument("--memory", default="fast,low", help="memory modes, comma-separated")
    parser.add_argument("--guidance-batch", default="auto", help="guidance batches, comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--name", default="memory-mode", help="the results' file name before -vm-<date>")
    args = parser.parse_args()
    import recipes_backends
    from edgesd.benchmark import BenchSettings, BenchTarget, measure_in_child

    settings = BenchSettings(steps=args.steps, width=512, height=512, guidance=7.5)
    configs = [(name, memory, batch) for name in args.recipes.split(",") for memory in args.memory.split(",")
               for batch in args.guidance_batch.split(",")]
    for name in dict.fromkeys(c[0] for c in configs):
        if not (HERE / "work" / "recipes" / name / "done").is_file():
            raise SystemExit(f"error: {HERE / 'work' / 'recipes' / name} is missing; run bench/recipes_backends.py "
                             f"--configs {name.replace('onnx-', 'onnxruntime:').replace('openvino-', 'openvino:')}")
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(dir=HERE / "work") as caches:
        for round_ in range(args.rounds):
            for name, memory, batch in configs:
                options = {"memory": memory, "guidance_batch": batch, "cache_dir": f"{caches}/{name}-{memory}"}
                target = BenchTarget(HERE / "work" / "recipes" / name,
                                     f"{name} --memory {memory} --guidance-batch {batch}", options)
                if round_ == 0:
                    measure_in_child(target, BenchSettings(steps=1, width=512, height=512))  # fills the cache
                run = {"recipe": name, "memory": memory, "guidance_batch": batch, **measure_in_child(target, settings)}
                runs[(name, memory, batch)].append(run)
                print(json.dumps(run), flush=True)
    rows = [_median(found) for found in runs.values()]
    today = str(date.today())
    stem = HERE / "results" / f"{args.name}-vm-{today}"
    machine = recipes_backends.machine()
    stem.with_suffix(".json").write_text(json.dumps({"date": today, "machine": machine, "steps": args.steps,
                                                     "rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    lines = [f"# --memory and --guidance-batch, SD 1.5 architecture with RANDOM weights, 512x512, {args.steps} steps, "
             f"guidance 7.5", "",
             f"{today}, `bench/memory_mode.py`; {machine['cpu']}, {machine['cores']} cores "
             f"({', '.join(machine['isa'])}), {machine['ram_gb']} GB. A 1-step warm-up picture, then the "
             "measured one; peak RSS over both and the load; "
             f"median of {args.rounds} round(s) by U-Net s/step.", "",
             "| recipe | memory | guidance batch | load s | measured picture s | U-Net s/step | VAE s | peak RSS GB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['recipe']} | {r['memory']} | {r['guidance_batch']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |||||")
        else:
            lines.append(f"{head} {r['load_s']} | {r['total_s']} | {r['unet_s_per_step']} | {r['vae_s']} | "
                         f"{r['peak_rss_gb']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


def _median(runs: list[dict]) -> dict:
    """The median round by U-Net s/step (a failed round, if any, is the row: it needs looking at)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ranked = sorted(runs, key=lambda r: r["unet_s_per_step"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_unet_s_per_step": [r["unet_s_per_step"] for r in runs]}


if __name__ == "__main__":
    main()
