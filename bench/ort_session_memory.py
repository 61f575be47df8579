"""ONNX Runtime session options vs load time, step time and peak RSS on the SD 1.5 U-Net (RANDOM weights).

    .venv/bin/python bench/ort_session_memory.py     # needs bench/work/sd15-random-onnx (bench/sd15_foundation.py)

Each variant runs in its own process (two U-Net calls, batch 2, 512x512); prints one line per variant
and writes bench/results/ort-session-memory-<machine>-<date>.txt.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNET = HERE / "work" / "sd15-random-onnx" / "unet" / "model.onnx"
VARIANTS = ["default", "noarena", "noprepack", "noarena_noprepack"]


def run_variant(variant: str) -> str:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if "noarena" in variant:
        options.enable_cpu_mem_arena = False
    if "noprepack" in variant:
        options.add_session_config_entry("session.disable_prepacking", "1")
    start = time.perf_counter()
    session = ort.InferenceSession(str(UNET), options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
             "timestep": np.array([500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    steps = []
    for _ in range(2):
        start = time.perf_counter()
        session.run(["out_sample"], feeds)
        steps.append(round(time.perf_counter() - start, 2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return (f"{variant:<20} load {load:5.1f} s  rss after load {rss_load:.2f} GB  steps {steps} s  "
            f"peak rss {peak:.2f} GB")


def main() -> None:
    if len(sys.argv) > 1:
        print(run_variant(sys.argv[1]))
        return
    if not UNET.is_file():
        sys.exit(f"{UNET} is missing: run bench/sd15_foundation.py first")
    lines = [f"# {platform.node()} {date.today()}: SD 1.5 U-Net, RANDOM weights, batch 2, 512x512, fp32"]
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, check=True)
        lines.append(out.stdout.strip())
        print(lines[-1], flush=True)
    (HERE / "results" / f"ort-session-memory-{platform.node()}-{date.today()}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
