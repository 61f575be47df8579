"""--memory low with glibc's mmap threshold fixed at 8 MiB (what edgesd does, runtime/heap.py) against glibc's
dynamic threshold, on the SD 1.5 architecture with RANDOM weights, 512x512, guidance 7.5, Euler.

    .venv/bin/python bench/heap_threshold.py [--recipe onnx-int8+vae-int8] [--rounds 4] [--steps 4]

Each round runs both settings, each in a fresh process (the setting is process-wide): load with --memory low,
a 1-step warm-up picture, then the measured one; peak RSS is the process's (ru_maxrss) over all of it. The
cache folder is filled by a first process that is not measured. Results:
bench/results/heap-threshold-vm-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("dynamic", "fixed-8MiB")

CHILD = """
import json, resource, sys
import edgesd, edgesd.pipeline
folder, setting, cache, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if setting == "dynamic":  # glibc's own threshold: the pipeline's setting is skipped for this process only
    edgesd.pipeline.keep_large_blocks_off_heap = lambda: None
pipe = edgesd.Pipeline.load(folder, memory="low", cache_dir=cache)
run = dict(width=512, height=512, guidance_scale=7.5, seed=1, scheduler="euler")
pipe("a red circle", num_inference_steps=1, **run)
t = pipe("a red circle", num_inference_steps=steps, **run).timings
print("RESULT " + json.dumps({"unet_s_per_evaluation": round(t["unet_s"] / t["unet_evaluations"], 3),
                              "vae_decode_s": round(t["vae_decoder_s"], 3), "total_s": round(t["total_s"], 2),
                              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}))
"""


def child(folder: Path, setting: str, cache: str, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), setting, cache, str(steps)],
                          capture_output=True, text=True, check=True)
    return json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="onnx-int8+vae-int8")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    folder = HERE / "work" / "recipes" / args.recipe
    if not (folder / "done").is_file():
        raise SystemExit(f"error: {folder} is missing; run bench/recipes_backends.py first")
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory(dir=HERE / "work") as cache:
        child(folder, "dynamic", cache, 1)  # fills the cache
        for round_ in range(args.rounds):
            for setting in SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]:  # alternate who goes first
                runs[setting].append(child(folder, setting, cache, args.steps))
                print(setting, json.dumps(runs[setting][-1]), flush=True)
    rows = [{"setting": s, **{k: round(statistics.median(r[k] for r in found), 3) for k in found[0]},
             "peak_rss_gb_range": [min(r["peak_rss_gb"] for r in found), max(r["peak_rss_gb"] for r in found)]}
            for s, found in runs.items()]
    stem = HERE / "results" / f"heap-threshold-vm-{date.today()}"
    import recipes_backends

    machine = recipes_backends.machine()
    stem.with_suffix(".json").write_text(json.dumps({"recipe": args.recipe, "steps": args.steps, "machine": machine,
                                                     "rows": rows, "runs": runs}, indent=2) + "\n")
    lines = [f"# --memory low: glibc's mmap threshold, {args.recipe}, SD 1.5 architecture with RANDOM weights, "
             f"512x512, {args.steps} Euler steps", "",
             f"{date.today()}, `bench/heap_threshold.py --recipe {args.recipe} --rounds {args.rounds}`; "
             f"{machine['cpu']}, {machine['cores']} cores ({', '.join(machine['isa'])}), {machine['ram_gb']} GB. "
             f"Medians of {args.rounds} rounds, each setting in a fresh process.", "",
             "| setting | U-Net s/evaluation | VAE decode s | picture s | peak RSS GB (median) | range |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['setting']} | {r['unet_s_per_evaluation']} | {r['vae_decode_s']} | {r['total_s']} | "
              f"{r['peak_rss_gb']} | {r['peak_rss_gb_range'][0]}-{r['peak_rss_gb_range'][1]} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
