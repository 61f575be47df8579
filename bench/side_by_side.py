"""edgesd side by side with every peer, per backend and precision, on the SD 1.5 architecture with RANDOM
weights, 512x512, guidance 7.5, one fixed prompt, Euler, 20 steps; with a roofline.

    bash bench/peers/make_venvs.sh                       # once: one pinned venv per peer
    .venv/bin/python bench/side_by_side.py               # build what is missing, measure everything
    .venv/bin/python bench/side_by_side.py --configs edgesd-onnxruntime-int8,openvino-genai-int8-hybrid
    .venv/bin/python bench/side_by_side.py --readme      # only regenerate the README section from results

Builds (once, cached under bench/work/): the random-weight SD 1.5 folder and edgesd's fp32 ONNX export
(bench/sd15_foundation.py), edgesd's recipes (bench/recipes_backends.py), and each peer's own export
(bench/peers/build.py). Then, round after round (--rounds), runs every configuration in a fresh process
of its own venv (bench/peers/run_*.py; bench/peers/protocol.py says what each figure is), edgesd and peer
configurations taking turns; a figure is the median over the rounds. Configurations whose runtime has a
compile cache also get two start-only runs on one new cache folder: cold (filling it), then warm
(by default for the fp32 configurations only: a cache's saving hardly depends on the precision).
Roofline: the U-Net's FLOPs per step are counted from the graph (bench/flops.py) and set against this
machine's GEMM peaks, measured here (bench/gemm_peak.py).

Results: bench/results/<machine>-<date>.{json,md,png}; the README's performance section is generated from
the newest results (--readme).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(HERE / "peers")]

import build as peer_builds  # noqa: E402  (bench/peers/build.py)
import recipes_backends  # noqa: E402

VENVS = HERE / "venvs"
RESULTS = HERE / "results"
STEPS = 20
UNET_SHAPES = {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}


@dataclass(frozen=True)
class Config:
    name: str
    family: str  # "edgesd" or the peer's name
    precision: str  # the recipe / weight format
    runner: str  # bench/peers/run_<runner>.py
    venv: str  # ".venv" (the project's) or a folder under bench/venvs
    variant: str
    model: str  # edgesd: "<backend>:<recipe>"; peers: a build of bench/peers/build.py, or "source"
    compute: Literal["fp32", "int8"]  # which GEMM peak the U-Net is held against
    cache: bool  # the runtime has a compile cache (--cache-dir)
    # an opt-in speed-up whose picture differs from the like-for-like run (bf16 arithmetic, fewer guided steps)
    accelerated: bool = False

    def folder(self) -> Path:
        if self.family == "edgesd":
            return _edgesd_folder(*self.model.split(":"), added=next((k for k in ADDED_GRAPHS if k in self.variant), None))
        return peer_builds.source() if self.model == "source" else peer_builds.build(self.model)

    def python(self, override: str | None = None) -> Path:
        if override:
            return Path(override)
        return ROOT / ".venv" / "bin" / "python" if self.venv == ".venv" else VENVS / self.venv / "bin" / "python"


def _add_deepcache(folder: Path) -> None:
    from edgesd.export.deepcache import add_deepcache

    add_deepcache(folder)


def _add_tome(folder: Path) -> None:
    from edgesd.export.tome import add_tome

    add_tome(folder)


# opt-in rows whose model needs graphs added to the export: variant word -> (the graph it adds, how)
ADDED_GRAPHS = {"deepcache": ("unet_shallow", _add_deepcache), "tome": ("unet_tome", _add_tome)}  # by component


def _edgesd_folder(backend: str, recipe: str, added: str | None = None) -> Path:
    recipes_backends.build(backend, recipe)
    folder = recipes_backends.folder(backend, recipe)
    if added is None:
        return folder
    graph, add = ADDED_GRAPHS[added]
    copy = folder.with_name(f"{folder.name}-{added}")  # a copy: the like-for-like rows keep their graphs
    from edgesd.model import ModelFolder

    if not (copy.is_dir() and ModelFolder.open(copy).has(graph)):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(folder, copy)
        if not ModelFolder.open(copy).has(graph):  # a graph added to the recipe's folder itself comes along
            add(copy)
    return copy


INT8_STATIC = {"int8", "int8-hybrid", "int8+vae-int8", "int8-hybrid+vae-int8"}


def all_configs() -> tuple[list[Config], list[Config]]:
    ours = [Config(f"edgesd-{b}-{r}", "edgesd", r, "edgesd", ".venv", b, f"{b}:{r}",
                   "int8" if r in INT8_STATIC else "fp32", True)
            for b, recipes in (("onnxruntime", recipes_backends.ONNX_RECIPES),
                               ("openvino", recipes_backends.IR_RECIPES)) for r in recipes]
    # edgesd variants beyond one per backend and recipe (bench/peers/run_edgesd.py's VARIANTS)
    for recipe, backend, variant, accelerated in (
            ("int8+vae-int8", "onnxruntime", "onnxruntime-low-memory", False),
            ("int8-hybrid+vae-int8", "openvino", "openvino-low-memory", False),
            ("int8-hybrid+vae-int8", "openvino", "openvino-bf16", True),
            ("int8+vae-int8", "openvino", "openvino-bf16", True),
            ("int8+vae-int8", "onnxruntime", "onnxruntime-guidance-cutoff-0.5", True),
            ("int8+vae-int8", "onnxruntime", "onnxruntime-deepcache-2", True),
            ("int8+vae-int8", "onnxruntime", "onnxruntime-tome-0.5", True),
            ("int8-hybrid+vae-int8", "openvino", "openvino-bf16-guidance-cutoff-0.5", True)):
        ours.append(Config(f"edgesd-{backend}-{recipe}{variant[len(backend):]}", "edgesd", recipe, "edgesd", ".venv", variant,
                           f"{backend}:{recipe}", "int8", True, accelerated))
    ir = {"fp32": "optimum-intel-fp32", "int8": "optimum-intel-int8", "int8-hybrid": "optimum-intel-int8-hybrid"}
    peers = [Config("diffusers-fp32", "diffusers", "fp32", "diffusers", "diffusers", "diffusers", "source",
                    "fp32", False),
             Config("optimum-onnx-fp32", "optimum-onnx", "fp32", "diffusers", "optimum-onnx", "optimum-onnx",
                    "optimum-onnx-fp32", "fp32", False)]
    for precision, build in ir.items():
        compute = "int8" if precision == "int8-hybrid" else "fp32"
        peers.append(Config(f"optimum-intel-{precision}", "optimum-intel", precision, "diffusers", "optimum-intel",
                            "optimum-intel", build, compute, True))
        peers.append(Config(f"openvino-genai-{precision}", "openvino-genai", precision, "genai", "openvino-genai",
                            "default", build, compute, True))
    peers.append(Config("openvino-genai-int8-hybrid-bf16", "openvino-genai", "int8-hybrid", "genai",
                        "openvino-genai", "bf16", ir["int8-hybrid"], "int8", True, True))
    for variant in ("q8_0", "q8_0-flash"):
        peers.append(Config(f"sdcpp-{variant}", "stable-diffusion.cpp", "q8_0", "sdcpp", "sdcpp", variant, "source",
                            "int8", False))
    return ours, peers


def default_order() -> list[Config]:
    ours, peers = all_configs()
    # edgesd and the peers take turns, so slow drift of the machine does not favour either side
    order = []
    for i in range(max(len(ours), len(peers))):
        order += ours[i:i + 1] + peers[i:i + 1]
    return order


def run_runner(config: Config, folder: Path, steps: int, threads: int | None, cache: Path | None = None,
               start_only: bool = False, python: str | None = None) -> dict:
    cmd = [str(config.python(python)), str(HERE / "peers" / f"run_{config.runner}.py"), "--model", str(folder),
           "--steps", str(steps), "--variant", config.variant]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--cache-dir", str(cache)] if cache else []
    cmd += ["--start-only"] if start_only else []
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]}
    return json.loads(lines[-1][len("RESULT "):])


def disk_gb(folder: Path) -> float:
    """Bytes of the model files a runtime reads (graphs, weights; not caches or tokenizer files), following the
    links of the peers' source folder."""
    suffixes = (".onnx", ".onnx_data", ".bin", ".xml", ".safetensors", ".data")
    files = {Path(root, name).resolve() for root, _, names in os.walk(folder, followlinks=True) for name in names
             if "cache" not in Path(root).parts and "tokenizer" not in Path(root).name
             and (Path(name).suffix in suffixes or name.startswith("model.onnx"))}
    return round(sum(p.stat().st_size for p in files) / 1e9, 3)


def measure(config: Config, rounds: list[dict], steps: int) -> dict:
    """One configuration's row: medians over its rounds, the 20-step total, the cold start."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[-1]["error"]}
    row = {k: round(statistics.median(r[k] for r in ok), 3) for k in ok[0] if isinstance(ok[0][k], (int, float))
           and all(isinstance(r.get(k), (int, float)) for r in ok)}
    row["rounds"] = len(ok)
    # the 20-step total: measured when the run had 20 steps, else its total plus the missing steps
    row["total_20_s"] = round(row["total_s"] + (STEPS - steps) * row["unet_s_per_step"], 2)
    row["total_20_measured"] = steps == STEPS
    row["cold_start_s"] = round(row["load_s"] + row["compile_s"], 2)
    return row


def warm_start(config: Config, folder: Path, threads: int | None, python: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=HERE / "work") as cache:
        cold, warm = (run_runner(config, folder, 1, threads, Path(cache), True, python) for _ in range(2))
    if "error" in cold or "error" in warm:
        return {"cache_error": (cold.get("error") or warm.get("error"))}
    return {"cache_cold_start_s": round(cold["load_s"] + cold["compile_s"], 2),
            "warm_start_s": round(warm["load_s"] + warm["compile_s"], 2)}


def roofline(rows: list[dict], peaks: dict) -> None:
    """Adds each row's achieved U-Net throughput and its share of the matching GEMM peak."""
    from flops import count_flops

    flops = sum(count_flops(recipes_backends.FP32 / "unet" / "model.onnx", UNET_SHAPES).values())
    for row in rows:
        if "unet_s_per_step" not in row:
            continue
        row["unet_tflop_per_step"] = round(flops / 1e12, 3)
        achieved = flops / row["unet_s_per_step"] / 1e9
        row["unet_gflops"] = round(achieved, 1)
        row["peak_share"] = round(achieved / peaks[row["compute"]], 3)


def gemm_peaks() -> dict:
    import gemm_peak

    measured = {**gemm_peak.ort_peaks(2048, 5), **gemm_peak.ov_peaks(2048, 5)}
    return peaks_by_kind({k: round(v, 1) for k, v in measured.items()})


def peaks_by_kind(measured: dict[str, float]) -> dict:
    """The fp32 and int8 peaks (the best runtime of each) beside every measured GEMM."""
    return {"fp32": max(v for k, v in measured.items() if "fp32" in k or "f32" in k),
            "int8": max(v for k, v in measured.items() if "int8" in k or "s8" in k), "measured": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help="comma-separated names (default: all); --list shows them")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--rounds", type=int, default=1, help="times each configuration is run (median)")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"steps of the timed generation (the {STEPS}-step total is extrapolated if fewer)")
    parser.add_argument("--threads", type=int, help="threads for every runtime (default: each one's own)")
    parser.add_argument("--machine", default="vm", help="name of this machine in the results' file name")
    parser.add_argument("--threads-sweep", help="comma-separated thread counts: each configuration at each (scaling)")
    parser.add_argument("--warm-start", default="fp32",
                        help="precisions whose cache-capable configurations get the cold/warm starts ('' = none)")
    parser.add_argument("--python", help="run every runner with this interpreter (a machine where one environment "
                                             "holds every runtime, such as the device machine)")
    parser.add_argument("--report-from", type=Path, help="only write the results from rows a run kept in bench/work")
    parser.add_argument("--combine", type=Path, nargs="+", help="only combine results files of one machine into one")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README section")
    args = parser.parse_args()
    import report

    if args.readme:
        report.update_readme()
        return
    if args.report_from:
        finish(json.loads(args.report_from.read_text()), gemm_peaks(), args)
        return
    if args.combine:
        combine(args.combine, args)
        return
    configs = default_order()
    if args.list:
        print("\n".join(c.name for c in configs))
        return
    if args.configs:
        known = {c.name: c for c in configs}
        unknown = [n for n in args.configs.split(",") if n not in known]
        if unknown:
            sys.exit(f"error: unknown configuration {', '.join(unknown)}; --list shows the names")
        configs = [known[n] for n in args.configs.split(",")]
    if args.steps < 2:
        sys.exit("error: --steps must be at least 2 (the step time is the median interval between steps)")
    folders = {c.name: c.folder() for c in configs}  # builds what is missing, before any timing
    threads = [int(t) for t in args.threads_sweep.split(",")] if args.threads_sweep else [args.threads]
    raw: dict[tuple, list[dict]] = {(c.name, t): [] for c in configs for t in threads}
    for r in range(args.rounds):
        for t in threads:
            for c in configs:
                raw[c.name, t].append(run_runner(c, folders[c.name], args.steps, t, python=args.python))
                print(f"round {r + 1} {c.name} threads={t}: {raw[c.name, t][-1]}", flush=True)
    rows = []
    for c in configs:
        for t in threads:
            row = {**asdict(c), "threads": t, "sweep": bool(args.threads_sweep),
                   **measure(c, raw[c.name, t], args.steps)}
            if c.cache and c.precision in args.warm_start.split(",") and "error" not in row:
                row.update(warm_start(c, folders[c.name], t, args.python))
            rows.append(row)
            print(f"{c.name}: {row}", flush=True)
    # kept before the roofline and the report, so a failure there loses no measurement (--report-from)
    (HERE / "work" / f"side-by-side-rows-{args.machine}.json").write_text(json.dumps(rows, indent=2))
    finish(rows, gemm_peaks(), args)


def finish(rows: list[dict], peaks: dict, args, versions: dict | None = None, machine: dict | None = None) -> None:
    import report

    configs = {c.name: c for c in default_order()}
    for row in rows:  # size on disk of what each configuration reads (builds are cached by now)
        row["disk_gb"] = disk_gb(configs[row["name"]].folder())
    roofline(rows, peaks)
    stem = report.write(rows, peaks, args, versions, machine)
    print(f"wrote {stem}.json, .md and .png")


def combine(paths: list[Path], args) -> None:
    """Results of one machine measured in parts (the device machine's calls) -> one results file. A GEMM peak is
    a best-of measurement, so the combined peak of each kind is the highest of the parts'."""
    parts = [json.loads(p.read_text()) for p in paths]
    measured: dict[str, float] = {}
    for part in parts:
        for k, v in part["gemm_peaks_gops"]["measured"].items():
            measured[k] = max(v, measured.get(k, 0.0))
    known = {c.name for c in default_order()}  # rows of configurations this script no longer has are dropped
    rows = {(r["name"], r.get("threads")): r for part in parts for r in part["rows"] if r["name"] in known}
    used = {"edgesd" if r["venv"] == ".venv" else r["venv"] for r in rows.values()}
    versions = {venv: pins for part in parts for venv, pins in part["versions"].items() if venv in used}
    finish(list(rows.values()), peaks_by_kind(measured), args, versions, parts[-1]["machine"])


if __name__ == "__main__":
    main()
