"""Where an OpenVINO warm start goes, per graph: reading the IR, reshaping it to the picture's static shapes,
and compiling it from OpenVINO's cache (what `edgesd generate --backend openvino` does on its second start).

    .venv/bin/python bench/ov_warm_start.py [FOLDER] [--rounds 3] [--perf] [--suffix -perf]

FOLDER defaults to bench/work/recipes/openvino-int8-hybrid+vae-int8 (made by bench/recipes_backends.py; SD 1.5
architecture with RANDOM weights). Each round runs in a fresh process on one cache folder; the first fills it
(cold), the later ones read it (warm). With --perf one more start, of the U-Net alone from the filled cache,
runs under Linux `perf record` and the table says where its CPU time went (per library; "[JIT]" is code
OpenVINO's CPU plugin generates at run time, oneDNN's kernels). Results:
bench/results/ov-warm-start-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def one_start(folder: Path, cache: Path, only: str | None = None) -> dict:
    """One start in this process: per graph (or the graph `only`), seconds to read, reshape, compile (from the
    cache when filled)."""
    import openvino as ov

    from edgesd.backends.base import RuntimeOptions
    from edgesd.backends.openvino_backend import compile_config

    core = ov.Core()
    config = compile_config(RuntimeOptions(backend="openvino", cache_dir=cache))  # edgesd's own settings
    rows = {}
    for component, shapes in SHAPES.items():
        if only not in (None, component):
            continue
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
    parser.add_argument("--perf", action="store_true", help="profile a warm U-Net start with Linux perf")
    parser.add_argument("--suffix", default="", help="added to the results' file names (-perf: ...-<date>-perf.md)")
    parser.add_argument("--child-cache", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_cache is not None:
        print(json.dumps(one_start(args.folder, args.child_cache, args.child_only)))
        return
    if args.perf and not shutil.which("perf"):
        raise SystemExit("--perf needs Linux perf (Debian: apt install linux-perf)")
    from families_scale import machine as machine_line  # bench/ is on sys.path when a script of it runs

    rounds = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            done = subprocess.run([sys.executable, __file__, str(args.folder), "--child-cache", cache],
                                  capture_output=True, text=True, check=True)
            rounds.append(json.loads(done.stdout.strip().splitlines()[-1]))
        profile = perf_unet_start(args.folder, Path(cache)) if args.perf else None
    machine = machine_line()
    result = {"folder": str(args.folder), "machine": machine, "threads": os.cpu_count(), "rounds": rounds,
              "unet_warm_start_profile": profile}
    lines = [f"OpenVINO start, per graph (`bench/ov_warm_start.py`, {args.folder.name}, SD 1.5 architecture with "
             f"RANDOM weights, 512x512 shapes; {machine}). Round 1 fills the cache (cold), the others read it.", "",
             "| round | graph | read s | reshape s | compile s |", "|---|---|---:|---:|---:|"]
    for i, start in enumerate(rounds, 1):
        for component, row in start.items():
            lines.append(f"| {i} | {component} | {row['read_s']} | {row['reshape_s']} | {row['compile_s']} |")
        lines.append(f"| {i} | **all** | {sum(r['read_s'] for r in start.values()):.2f} | "
                     f"{sum(r['reshape_s'] for r in start.values()):.2f} | "
                     f"{sum(r['compile_s'] for r in start.values()):.2f} |")
    if profile:
        lines += ["", f"Where a warm U-Net start's CPU time goes (`perf record`, {profile['samples']} samples; its "
                  f"compile took {profile['compile_s']} s):", "", "| library | share |", "|---|---:|"]
        lines += [f"| {name} | {share:.1%} |" for name, share in profile["shares"].items()]
        lines += ["", "oneDNN's reorders in a warm U-Net start (`ONEDNN_VERBOSE=1`; zpm: zero-point compensation, "
                  "s8m: s8 compensation):", "", "| reorder | count | s |", "|---|---:|---:|"]
        lines += [f"| {kind} | {r['count']} | {r['s']} |" for kind, r in profile["reorders"].items()]
    stem = HERE / "results" / f"ov-warm-start-vm-{date.today()}{args.suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def perf_unet_start(folder: Path, cache: Path) -> dict:
    """The U-Net compiled from the filled cache in a fresh process under `perf record`: CPU time per library."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        done = subprocess.run(["perf", "record", "-q", "-F", "999", "-o", str(data), sys.executable, __file__,
                               str(folder), "--child-cache", str(cache), "--child-only", "unet"],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])["unet"]
        report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio", "-g", "none",
                                 "--no-children", "--show-nr-samples"], capture_output=True, text=True, check=True)
    shares, samples = {}, 0
    for line in report.stdout.splitlines():  # "    57.06%   12345  [JIT] tid 31409"
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].endswith("%"):
            name = "[JIT] (generated kernels)" if parts[2].startswith("[JIT]") else parts[2].strip()
            shares[name] = shares.get(name, 0.0) + float(parts[0][:-1]) / 100
            samples += int(parts[1])
    top = dict(sorted(shares.items(), key=lambda kv: -kv[1])[:8])
    return {"compile_s": row["compile_s"], "samples": samples, "shares": top,
            "reorders": weight_reorders(folder, cache)}


def weight_reorders(folder: Path, cache: Path) -> dict:
    """The U-Net compiled from the filled cache once more with oneDNN's verbose log: its reorders (weights into
    the kernels' layouts) summed per source type and flags, in seconds, with their count."""
    done = subprocess.run([sys.executable, __file__, str(folder), "--child-cache", str(cache), "--child-only", "unet"],
                          capture_output=True, text=True, check=True, env={**os.environ, "ONEDNN_VERBOSE": "1"})
    kinds: dict = {}
    # onednn_verbose,v1,primitive,exec,cpu,reorder,<impl>,<prop>,src:... dst:...,<attr>,<aux>,<dims>,<ms>
    for line in done.stdout.splitlines():
        fields = line.split(",")
        if len(fields) > 8 and fields[3] == "exec" and fields[5] == "reorder":
            src, dst = (fields[8].split() + ["", ""])[:2]
            flags = dst.rsplit(":", 2)[-2:] if "zpm" in dst or "s8m" in dst else []
            kind = f"{src.split(':')[1]} weights{' with ' + ', '.join(flags) if flags else ''}"
            seconds, count = kinds.get(kind, (0.0, 0))
            kinds[kind] = (seconds + float(fields[-1]) / 1000, count + 1)
    return {kind: {"s": round(s, 3), "count": n} for kind, (s, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])}


if __name__ == "__main__":
    main()
