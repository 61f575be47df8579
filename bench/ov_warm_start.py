"""Where an OpenVINO warm start goes, per graph: reading the IR, reshaping it to the picture's static shapes,
and compiling it from OpenVINO's cache (what `edgesd generate --backend openvino` does on its second start).

    .venv/bin/python bench/ov_warm_start.py [FOLDER] [--rounds 3]

FOLDER defaults to bench/work/recipes/openvino-int8-hybrid+vae-int8 (made by bench/recipes_backends.py; SD 1.5
architecture with RANDOM weights). Each round runs in a fresh process on one cache folder; the first fills it
(cold), the later ones read it (warm). Results: bench/results/ov-warm-start-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "work" / "recipes" / "openvino-int8-hybrid+vae-int8"
# 512x512, guidance 7.5: the U-Net at batch 2, the VAE at batch 1
SHAPES = {"text_encoder": {"input_ids": [2, 77]},
          "unet": {"sample": [2, 4, 64, 64], "timestep": [2], "encoder_hidden_states": [2, 77, 768]},
          "vae_decoder": {"latent_sample": [1, 4, 64, 64]}}


def graph_file(folder: Path, component: str) -> Path:
    xml = folder / component / "openvino_model.xml"
    return xml if xml.is_file() else folder / component / "model.onnx"


def one_start(folder: Path, cache: Path) -> dict:
    """One start in this process: per graph, seconds to read, reshape, compile (from the cache when filled)."""
    import openvino as ov

    from edgesd.backends.base import RuntimeOptions
    from edgesd.backends.openvino_backend import compile_config

    core = ov.Core()
    config = compile_config(RuntimeOptions(backend="openvino", cache_dir=cache))  # edgesd's own settings
    rows = {}
    for component, shapes in SHAPES.items():
        path = graph_file(folder, component)
        start = time.perf_counter()
        model = core.read_model(str(path))
        read = time.perf_counter() - start
        start = time.perf_counter()
        model.reshape({port.get_any_name(): ov.PartialShape(shapes[port.get_any_name()]) for port in model.inputs})
        reshape = time.perf_counter() - start
        static = cache / f"static-{component}.xml"  # as edgesd compiles a static graph: from a saved copy
        if not static.is_file():
            ov.save_model(model, str(static), compress_to_fp16=False)
        del model
        start = time.perf_counter()
        compiled = core.compile_model(str(static), "CPU", config)
        compiled.create_infer_request()
        rows[component] = {"read_s": round(read, 3), "reshape_s": round(reshape, 3),
                           "compile_s": round(time.perf_counter() - start, 3), "graph": str(path.name)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child-cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_cache is not None:
        print(json.dumps(one_start(args.folder, args.child_cache)))
        return
    from families_scale import machine as machine_line  # bench/ is on sys.path when a script of it runs

    rounds = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            done = subprocess.run([sys.executable, __file__, str(args.folder), "--child-cache", cache],
                                  capture_output=True, text=True, check=True)
            rounds.append(json.loads(done.stdout.strip().splitlines()[-1]))
    machine = machine_line()
    result = {"folder": str(args.folder), "machine": machine, "threads": os.cpu_count(), "rounds": rounds}
    lines = [f"OpenVINO start, per graph (`bench/ov_warm_start.py`, {args.folder.name}, SD 1.5 architecture with "
             f"RANDOM weights, 512x512 shapes; {machine}). Round 1 fills the cache (cold), the others read it.", "",
             "| round | graph | read s | reshape s | compile s |", "|---|---|---:|---:|---:|"]
    for i, start in enumerate(rounds, 1):
        for component, row in start.items():
            lines.append(f"| {i} | {component} | {row['read_s']} | {row['reshape_s']} | {row['compile_s']} |")
        lines.append(f"| {i} | **all** | {sum(r['read_s'] for r in start.values()):.2f} | "
                     f"{sum(r['reshape_s'] for r in start.values()):.2f} | "
                     f"{sum(r['compile_s'] for r in start.values()):.2f} |")
    stem = HERE / "results" / f"ov-warm-start-vm-{date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
