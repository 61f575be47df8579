"""Where a U-Net step's time goes: OpenVINO's per-node counters, summed by layer type and precision.

    .venv/bin/python bench/unet_profile.py [--recipes fp32,int8] [--runs 2] [--precision f32,bf16]

SD 1.5 architecture with RANDOM weights, 512 x 512, batch 2, static shapes, f32 inference precision, the IR
written by `bench/recipes_backends.py` (bench/work/recipes/openvino-<recipe>). For each recipe and inference
precision (OpenVINO's INFERENCE_PRECISION_HINT: the arithmetic of every layer the recipe left in float, bf16
only where the CPU has it): total time per step, then the layer types taking most of it with the precision they ran in (OpenVINO's exec type, e.g.
jit_avx2_FP32 or brgemm_avx2_I8). Results:
bench/results/unet-profile-vm-<date>.md.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np

from recipes_backends import machine  # bench/ is on sys.path when a script of it runs

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "recipes"
TOP = 12


def profile(recipe: str, runs: int, precision: str = "f32") -> tuple[float, float, list[tuple[str, str, float, int]]]:
    """Sum of the node times per step, the fastest call's wall time, and the rows by (type, exec type)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(WORK / f"openvino-{recipe}" / "unet" / "openvino_model.xml"))
    shapes = {"sample": [2, 4, 64, 64], "timestep": [2], "encoder_hidden_states": [2, 77, 768]}
    model.reshape({k: ov.PartialShape(v) for k, v in shapes.items()})
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": "YES", "INFERENCE_PRECISION_HINT": precision,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal(shapes["sample"], dtype=np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"], dtype=np.float32)}
    request.infer(feeds)  # warm-up
    totals: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0])
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer(feeds)
        walls.append(time.perf_counter() - start)
        for info in request.profiling_info:
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            key = (info.node_type, info.exec_type)
            totals[key][0] += info.real_time.total_seconds() / runs
            totals[key][1] += 1
    rows = sorted(((t, e, s, n // runs) for (t, e), (s, n) in totals.items()), key=lambda r: -r[2])
    return sum(r[2] for r in rows), min(walls), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fp32,int8")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--suffix", default="", help="added to the result file's name")
    parser.add_argument("--precision", default="f32", help="inference precisions, comma-separated (f32, bf16)")
    args = parser.parse_args()
    m = machine()
    lines = [f"# Where the U-Net step goes (OpenVINO per-node counters)", "",
             f"{date.today()}, `bench/unet_profile.py`, {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}); "
             "SD 1.5 architecture, RANDOM "
             "weights, 512x512, batch 2, latency hint.", ""]
    for recipe, precision in ((r, p) for r in args.recipes.split(",") for p in args.precision.split(",")):
        total, wall, rows = profile(recipe, args.runs, precision)
        lines += [f"## {recipe}, {precision} inference precision: {total:.2f} s per step (sum of node times), "
                  f"fastest call {wall:.2f} s", "",
                  "| layer type | exec type (kernel, precision) | nodes | s per step | share |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {t} | {e} | {n} | {s:.3f} | {100 * s / total:.1f}% |" for t, e, s, n in rows[:TOP]]
        rest = sum(r[2] for r in rows[TOP:])
        lines += [f"| (the other {len(rows) - TOP} kinds) | | | {rest:.3f} | {100 * rest / total:.1f}% |", ""]
        print("\n".join(lines[-TOP - 6:]), flush=True)
    out = HERE / "results" / f"unet-profile-vm-{date.today()}{args.suffix}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
