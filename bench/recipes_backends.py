"""Each precision recipe x backend on the SD 1.5 architecture with RANDOM weights, 512 x 512.

    .venv/bin/python bench/recipes_backends.py                       # build what is missing, measure all
    .venv/bin/python bench/recipes_backends.py --configs onnxruntime:fp32,openvino:int8 --runs 3
    .venv/bin/python bench/recipes_backends.py --attention unfused    # the same without the attention fusion

Starts from the fp32 ONNX export of `bench/sd15_foundation.py` (bench/work/sd15-random-onnx), made first
where missing (`foundation`). Builds each
recipe's graphs from it with the exporter's own functions (`write_recipe` for ONNX, `write_ir_recipe` for
OpenVINO IR) into bench/work/recipes/<format>-<recipe>/. The activation-quantized recipes (int8,
int8-hybrid) are calibrated on the U-Net inputs of the fp32 pipeline run over CALIBRATION_PROMPTS at
CALIBRATION_SIZE, CALIBRATION_FEEDS of them (random weights: the ranges only need to be realistic).

Then for each configuration, in a fresh process (its peak RSS is its own), alternating nothing else:
load time (all three graphs), text encoder (batch 2: prompt + negative), the first U-Net call (OpenVINO
compiles for the static shapes there), U-Net seconds per step (batch 2 = classifier-free guidance, the
median of --runs calls after the first), VAE decode (one 512 x 512 image, median of 2), peak RSS, size on
disk of the three graphs. Then, for the cache options: a second start with --cache-dir filled (OpenVINO:
compiled blobs; ONNX Runtime: optimised graphs), cold and warm.

Results: bench/results/recipes-backends-<machine>-<date>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
FP32 = HERE / "work" / "sd15-random-onnx"
WORK = HERE / "work" / "recipes"
# --attention unfused: the same from an export without the attention fusion (what that lever gains)
UNFUSED_FP32, UNFUSED_WORK = HERE / "work" / "sd15-random-onnx-unfused", HERE / "work" / "recipes-unfused"
GRAPHS3 = ("text_encoder", "unet", "vae_decoder")
CALIBRATION_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor fox in the snow")
CALIBRATION_SIZE, CALIBRATION_STEPS = 256, 4
# U-Net inputs used, evenly spaced over the runs: onnxruntime's MinMax calibration keeps every intermediate
# tensor of every input in memory (its CalibMaxIntermediateOutputs option drops them uncounted in 1.32).
CALIBRATION_FEEDS = 3
ONNX_RECIPES = ("fp32", "fp16", "int8-weights", "int4-weights", "int8", "int8+vae-int8")
IR_RECIPES = ONNX_RECIPES + ("int8-hybrid", "int8-hybrid+vae-int8")
# bench names for a recipe with per-component overrides -> (recipe, overrides); +vae-int8: `--vae-recipe int8`
# (the static int8 VAE decoder, ONNX QDQ in an IR folder too)
WITH_OVERRIDES = {"int8+vae-int8": ("int8", {"vae_decoder": "int8"}),
                  "int8-hybrid+vae-int8": ("int8-hybrid", {"vae_decoder": "int8"})}
DEFAULT_CONFIGS = [f"onnxruntime:{r}" for r in ONNX_RECIPES] + [f"openvino:{r}" for r in IR_RECIPES]
# The targets for this machine.
TARGET_UNET_S, TARGET_VAE_S, TARGET_INT8_UNET_GB = 1.35, 2.2, 0.9


def folder(backend: str, recipe: str) -> Path:
    if backend == "onnxruntime" and recipe == "fp32":
        return FP32
    return WORK / f"{'onnx' if backend == 'onnxruntime' else 'openvino'}-{recipe}"


def calibration(graph: str = "unet") -> list:
    """The inputs of `graph` (unet: every call; vae_decoder: the final latents, cropped as the exporter crops
    them) over the fp32 pipeline's runs, cached in WORK per graph (they take minutes to record)."""
    import numpy as np

    cache = WORK / ("calibration.npz" if graph == "unet" else f"calibration-{graph}.npz")
    if cache.is_file():
        data = np.load(cache)
        n = len({k.split("/")[0] for k in data.files})
        names = dict.fromkeys(k.split("/", 1)[1] for k in data.files)
        return [{name: data[f"{i}/{name}"] for name in names} for i in range(n)]
    from edgesd import Pipeline
    from edgesd.export.fidelity import _Recording, cropped_latents

    pipe = Pipeline.load(FP32)
    runs: list = []
    pipe.graphs[graph] = _Recording(pipe.graphs[graph], runs)
    for prompt in CALIBRATION_PROMPTS:
        pipe(prompt, num_inference_steps=CALIBRATION_STEPS, width=CALIBRATION_SIZE, height=CALIBRATION_SIZE,
             seed=0)
    feeds = [f if graph == "unet" else cropped_latents(f) for f, _ in runs]
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    return feeds


def use_unfused_baseline() -> None:
    """Measure from the unfused export: FP32 and WORK name its folders for the rest of this process (and,
    through --attention, its children)."""
    global FP32, WORK
    FP32, WORK = UNFUSED_FP32, UNFUSED_WORK
    if not (FP32 / "edgesd.json").is_file():
        foundation("build")
        edgesd = Path(sys.executable).parent / "edgesd"  # the console script of this environment
        done = subprocess.run([str(edgesd), "export", str(HERE / "work" / "sd15-random"), str(FP32), "--overwrite",
                               "--attention", "unfused"])
        if done.returncode:
            raise SystemExit(f"error: the unfused export to {FP32} failed")


def foundation(phase: str = "export") -> Path:
    """The random-weight SD 1.5 folder ("build") or also its fp32 ONNX export ("export"), made by
    bench/sd15_foundation.py's phases (each in its own process) where missing, so one command on a fresh
    clone builds everything it measures."""
    wanted = {"build": HERE / "work" / "sd15-random" / "model_index.json", "export": FP32 / "edgesd.json"}
    for step in ("build", "export")[: ("build", "export").index(phase) + 1]:
        if not wanted[step].is_file():
            print(f"making {wanted[step].parent} (bench/sd15_foundation.py --phase {step})", flush=True)
            done = subprocess.run([sys.executable, str(HERE / "sd15_foundation.py"), "--phase", step])
            if done.returncode or not wanted[step].is_file():
                raise SystemExit(f"error: bench/sd15_foundation.py --phase {step} did not make {wanted[step]}")
    return FP32


def build(backend: str, recipe: str) -> None:
    from edgesd.export.openvino_ir import write_ir_recipe
    from edgesd.export.recipes import CALIBRATED, component_recipes, graph_file_format, write_recipe

    out = folder(backend, recipe)
    foundation()
    if (out / "done").is_file() or out == FP32:
        return
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(FP32, out, ignore=shutil.ignore_patterns("model.onnx*", "vae_encoder", "edgesd.json", "model_tome.onnx",
                                                         "unet_shallow"))  # added graphs are added to a recipe anew
    fmt = "onnx" if backend == "onnxruntime" else "openvino"
    base, overrides = WITH_OVERRIDES.get(recipe, (recipe, None))
    for component in GRAPHS3:
        r = component_recipes(base, overrides, fmt=fmt)[component]
        if base != recipe and r == component_recipes(base, fmt=fmt)[component]:
            build(backend, base)  # the graphs an override leaves as they are: from the base recipe's folder
            shutil.rmtree(out / component)
            shutil.copytree(folder(backend, base) / component, out / component)
            continue
        feeds = None
        if r in CALIBRATED:
            every = calibration(component)
            feeds = every[:: max(1, len(every) // CALIBRATION_FEEDS)][:CALIBRATION_FEEDS]
        start = time.perf_counter()
        src = FP32 / component / "model.onnx"
        if graph_file_format(component, r, fmt) == "openvino":
            write_ir_recipe(src, out / component, r, feeds)
        else:
            write_recipe(src, out / component / "model.onnx", r, feeds, component)
        print(f"built {backend}:{recipe} {component} ({r}) in {time.perf_counter() - start:.0f} s", flush=True)
    (out / "done").write_text("ok\n")


def graph_bytes(path: Path) -> int:
    return sum(f.stat().st_size for c in GRAPHS3 for f in (path / c).iterdir()
               if f.name.startswith(("model.onnx", "openvino_model.")))


def measure(backend: str, recipe: str, runs: int, cache_dir: str | None) -> dict:
    """One configuration, in this (fresh) process (the graph-level protocol of edgesd.benchmark)."""
    from edgesd import Pipeline
    from edgesd.benchmark import measure_graphs

    # the cache only where a cold/warm start is measured (by default it fills the user's cache folder)
    options = {"backend": backend, "threads": None, "cache": "on" if cache_dir else "off"}
    if cache_dir:
        options["cache_dir"] = Path(cache_dir)
    start = time.perf_counter()
    pipe = Pipeline.load(folder(backend, recipe), **options)
    load_s = time.perf_counter() - start
    return {"load_s": round(load_s, 2), **measure_graphs(pipe, runs)}


def run_child(backend: str, recipe: str, runs: int, cache_dir: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--measure", f"{backend}:{recipe}", "--runs", str(runs)]
    if FP32 == UNFUSED_FP32:
        cmd += ["--attention", "unfused"]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return {"name": "vm", "cpu": cpu, "cores": os.cpu_count(), "isa": isa,
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "python": platform.python_version()}


def write_results(rows: list[dict], caches: list[dict], suffix: str = "") -> Path:
    import onnxruntime
    import openvino

    today = str(date.today())
    stem = HERE / "results" / f"recipes-backends-vm-{today}{suffix}"
    result = {"date": today, "machine": machine(), "onnxruntime": onnxruntime.__version__,
              "openvino": openvino.__version__, "weights": "random (SD 1.5 architecture)", "size": 512,
              "unet_batch": 2, "rows": rows, "cache": caches}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [f"# Recipes x backends, SD 1.5 architecture with RANDOM weights, 512x512", "",
             f"{today}, `bench/recipes_backends.py`; {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), "
             f"{m['ram_gb']} GB; onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__} "
             f"(f32 inference precision, latency hint, static shapes). U-Net batch 2 (classifier-free guidance); "
             f"VAE decode one image; each configuration in a fresh process.", "",
             "| backend | recipe | size GB (3 graphs) | load s | compile s | text encoder s | U-Net s/step | "
             "VAE decode s | peak RSS GB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['recipe']} | {r['size_gb']} | failed: {r['error']} ||||||")
            continue
        lines.append(f"| {r['backend']} | {r['recipe']} | {r['size_gb']} | {r['load_s']} | {r['compile_s']} | "
                     f"{r['text_encoder_s']} | {r['unet_s_per_step']} | {r['vae_decode_s']} | {r['peak_rss_gb']} |")
    if caches:
        lines += ["", "Second start with `--cache-dir` (load + first U-Net call, seconds):", "",
                  "| backend | recipe | cold (cache empty) | warm (cache filled) |", "|---|---|---:|---:|"]
        lines += [f"| {c['backend']} | {c['recipe']} | {c['cold_s']} | {c['warm_s']} |" for c in caches]
    ok = [r for r in rows if "error" not in r]
    if ok:
        best_unet = min(ok, key=lambda r: r["unet_s_per_step"])
        best_vae = min(ok, key=lambda r: r["vae_decode_s"])
        int8 = [r for r in ok if r["recipe"] == "int8"]
        unet_gb = min((r["unet_gb"] for r in int8), default=None)
        lines += ["", "Targets (issue 5, on this machine):", "",
                  f"- best U-Net step <= {TARGET_UNET_S} s: {best_unet['unet_s_per_step']} s "
                  f"({best_unet['backend']} {best_unet['recipe']}): "
                  f"{'met' if best_unet['unet_s_per_step'] <= TARGET_UNET_S else 'not met'}",
                  f"- VAE decode <= {TARGET_VAE_S} s: {best_vae['vae_decode_s']} s ({best_vae['backend']} "
                  f"{best_vae['recipe']}): {'met' if best_vae['vae_decode_s'] <= TARGET_VAE_S else 'not met'}"]
        if unet_gb is not None:
            lines.append(f"- int8 U-Net <= {TARGET_INT8_UNET_GB} GB on disk: {unet_gb} GB: "
                         f"{'met' if unet_gb <= TARGET_INT8_UNET_GB else 'not met'}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    chart(ok, stem.with_suffix(".png"))
    return stem


def chart(rows: list[dict], path: Path) -> None:
    """U-Net s/step and peak RSS per configuration."""
    from report import two_bar_chart  # bench/report.py

    two_bar_chart(path, "SD 1.5 (random weights) 512x512: U-Net s/step (blue), peak RSS GB (orange)",
                  [(f"{r['backend']} {r['recipe']}", False, r["unet_s_per_step"], "s", r["peak_rss_gb"], "GB")
                   for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="backend:recipe, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="U-Net calls measured after the first")
    parser.add_argument("--no-cache-check", action="store_true", help="skip the cold/warm --cache-dir starts")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--attention", choices=["fused", "unfused"], default="fused",
                        help="unfused: from an export without the attention fusion (--attention unfused)")
    args = parser.parse_args()
    if args.attention == "unfused":
        use_unfused_baseline()
    if args.measure:
        backend, recipe = args.measure.split(":")
        print(json.dumps(measure(backend, recipe, args.runs, args.cache_dir)))
        return
    foundation()
    configs = [c.split(":") for c in args.configs.split(",")]
    for backend, recipe in configs:
        build(backend, recipe)
    rows = []
    for backend, recipe in configs:
        path = folder(backend, recipe)
        unet_gb = sum(f.stat().st_size for f in (path / "unet").iterdir()
                      if f.name.startswith(("model.onnx", "openvino_model."))) / 1e9
        row = {"backend": backend, "recipe": recipe, "size_gb": round(graph_bytes(path) / 1e9, 3),
               "unet_gb": round(unet_gb, 3), **run_child(backend, recipe, args.runs)}
        rows.append(row)
        print(row, flush=True)
    caches = []
    if not args.no_cache_check:
        for backend, recipe in (("openvino", "fp32"), ("onnxruntime", "fp32")):
            with tempfile.TemporaryDirectory(dir=WORK) as cache:
                cold, warm = (run_child(backend, recipe, 0, cache) for _ in range(2))
            if "error" in cold or "error" in warm:
                print(f"cache check {backend}: {cold.get('error') or warm.get('error')}", flush=True)
                continue
            caches.append({"backend": backend, "recipe": recipe,
                           "cold_s": round(cold["load_s"] + cold["unet_first_call_s"], 1),
                           "warm_s": round(warm["load_s"] + warm["unet_first_call_s"], 1)})
            print(caches[-1], flush=True)
    stem = write_results(rows, caches, "-unfused" if FP32 == UNFUSED_FP32 else "")
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
