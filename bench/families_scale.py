"""Model families at real scale, RANDOM weights: the SDXL export (time, peak RSS, fp32 and int8), SDXL at
1024x1024 and LCM (SD 1.5 size) at 512x512 with 4 steps, edgesd beside diffusers on PyTorch in the same run.

    .venv/bin/python bench/families_scale.py                       # every phase, results in bench/results/
    .venv/bin/python bench/families_scale.py --phases sdxl-build,sdxl-export
    .venv/bin/python bench/families_scale.py --sdxl-steps 2        # timed SDXL steps (20-step totals extrapolated)

Each phase runs in a fresh process (its VmHWM is its own peak RSS); the build and export phases are cached in
bench/work. The architectures are the real ones (../shared/reference-configs: sdxl-base, lcm-sd15); the weights
are random, so the figures are time and memory, not picture quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from recipes_backends import WITH_OVERRIDES  # bench/ is on sys.path when a script of it runs
from torch_timing import ModuleTimer

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
CONFIGS = HERE.parent.parent / "shared" / "reference-configs"
PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 20  # the totals are for this many steps

MODELS = {  # name -> (reference config folder, diffusers pipeline class)
    "sdxl": ("sdxl-base", "StableDiffusionXLPipeline"),
    "lcm": ("lcm-sd15", "LatentConsistencyModelPipeline"),
    "sd15": ("sd15", "StableDiffusionPipeline"),  # bench/files_scale.py
}


def src(model: str) -> Path:
    return WORK / f"{model}-random"


def export_dir(model: str, recipe: str) -> Path:
    return WORK / f"{model}-random-onnx-{recipe}"


def peak_rss_gb() -> float:
    from edgesd.benchmark import peak_rss_bytes

    return round(peak_rss_bytes() / 1e9, 2)


def build(model: str) -> dict:
    """A diffusers folder of the reference architecture with random weights, one component at a time."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from edgesd.tokenizer import ClipTokenizer, packaged_vocab

    out, ref = src(model), CONFIGS / MODELS[model][0]
    if (out / "model_index.json").is_file():
        return {"cached": True}
    start = time.perf_counter()
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (ref / name).is_dir():
            continue
        if name == "unet":
            module = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ref / name))
        elif name == "vae":
            module = AutoencoderKL.from_config(AutoencoderKL.load_config(ref / name))
        else:
            config = CLIPTextConfig.from_pretrained(ref / name)
            projected = "CLIPTextModelWithProjection" in json.loads((ref / name / "config.json").read_text()).get(
                "architectures", [])
            module = (CLIPTextModelWithProjection if projected else CLIPTextModel)(config)
        module.save_pretrained(out / name)
        del module
    for name in ("tokenizer", "tokenizer_2"):  # the configs name the pad token; the vocabulary is CLIP's
        if (ref / name).is_dir():
            pad = json.loads((ref / name / "special_tokens_map.json").read_text()).get("pad_token", "<|endoftext|>")
            pad = pad["content"] if isinstance(pad, dict) else pad
            ClipTokenizer(*packaged_vocab(), pad_token=pad).write_folder(out / name)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text((ref / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((ref / "model_index.json").read_text())
    for key in ("safety_checker", "feature_extractor"):
        index.pop(key, None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return {"build_s": round(time.perf_counter() - start, 1), "peak_rss_gb": peak_rss_gb()}


def export(model: str, recipe: str) -> dict:
    from edgesd.export import ExportOptions, export_model

    out = export_dir(model, recipe)
    recipe, overrides = WITH_OVERRIDES.get(recipe, (recipe, None))  # bench names such as int8+vae-int8
    if (out / "edgesd.json").is_file():
        return {"cached": True, **json.loads((out / "export-bench.json").read_text())}
    start = time.perf_counter()
    report = export_model(src(model), out, ExportOptions(overwrite=True, recipe=recipe, allow_lossy=True,
                                                         component_overrides=overrides))
    sizes: dict[str, float] = {}
    for p in out.glob("*/model.onnx*"):
        sizes[p.parent.name] = sizes.get(p.parent.name, 0) + p.stat().st_size / 1e9
    result = {"export_s": round(time.perf_counter() - start, 1), "peak_rss_gb": peak_rss_gb(),
              "parity_db": {f"{r.component}.{r.output}": round(r.psnr_db, 1) for r in report.parity},
              "size_gb": {k: round(v, 2) for k, v in sizes.items()},
              "fidelity_worst_image_psnr_db": (round(report.fidelity.worst_image_psnr_db, 1)
                                               if report.fidelity and report.fidelity.image_psnr_db else None),
              "fidelity_passed": report.fidelity.passed if report.fidelity else None}
    (out / "export-bench.json").write_text(json.dumps(result))
    return result


def generation(model: str) -> tuple[int, int, float, str]:
    """(size, timed steps, guidance, sampler) of the model's benchmark generation."""
    return (1024, ARGS.sdxl_steps, 5.0, "euler") if model == "sdxl" else (512, 4, 8.5, "lcm")


def ours(model: str, recipe: str, backend: str = "auto") -> dict:
    import numpy as np

    import edgesd

    size, steps, guidance, sampler = generation(model)
    start = time.perf_counter()
    pipe = edgesd.Pipeline.load(export_dir(model, recipe), backend=backend)
    load_s = time.perf_counter() - start
    latents = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    result = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                  latents=latents, scheduler=sampler)
    t = result.timings
    text_s = sum(v for k, v in t.items() if k.startswith("text_encoder"))
    return {"load_s": round(load_s, 2), "text_encoder_s": round(text_s, 3), "unet_calls": t["unet_evaluations"],
            "unet_s_per_step": round(t["unet_s"] / t["unet_evaluations"], 3), "vae_decode_s": t["vae_decoder_s"],
            "total_s": t["total_s"], "steps": steps, "peak_rss_gb": peak_rss_gb()}


def diffusers_run(model: str) -> dict:
    import numpy as np
    import torch
    import diffusers

    size, steps, guidance, sampler = generation(model)
    start = time.perf_counter()
    kwargs = {"add_watermarker": False} if model == "sdxl" else {"safety_checker": None}
    # fp32 as edgesd computes (the SDXL configs say float16, which transformers 5 would load them as)
    pipe = getattr(diffusers, MODELS[model][1]).from_pretrained(src(model), torch_dtype=torch.float32, **kwargs)
    if sampler == "euler":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    timer = ModuleTimer()
    timer.watch(pipe.unet, "unet")
    timer.watch(pipe.vae.decoder, "vae")
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            timer.watch(getattr(pipe, name), name)
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8))
                               .astype(np.float32))
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size, latents=latents)
    seconds, calls = timer.seconds, timer.calls
    text_s = sum(v for k, v in seconds.items() if k.startswith("text_encoder"))
    return {"load_s": round(load_s, 2), "text_encoder_s": round(text_s, 3), "unet_calls": calls["unet"],
            "unet_s_per_step": round(seconds["unet"] / calls["unet"], 3), "vae_decode_s": round(seconds["vae"], 3),
            "total_s": round(time.perf_counter() - start, 2), "steps": steps, "peak_rss_gb": peak_rss_gb(),
            "torch_threads": torch.get_num_threads()}


PHASES = {
    "sdxl-build": lambda: build("sdxl"),
    "sdxl-export": lambda: export("sdxl", "fp32"),
    "sdxl-export-int8": lambda: export("sdxl", "int8"),
    "sdxl-export-int8-weights": lambda: export("sdxl", "int8-weights"),
    "sdxl-ours": lambda: ours("sdxl", ARGS.sdxl_recipe),
    "sdxl-ours-openvino": lambda: ours("sdxl", "fp32", backend="openvino"),  # OpenVINO on the ONNX files
    "sdxl-ours-int8-weights": lambda: ours("sdxl", "int8-weights"),
    "sdxl-diffusers": lambda: diffusers_run("sdxl"),
    "lcm-build": lambda: build("lcm"),
    "lcm-export": lambda: export("lcm", "fp32"),
    "lcm-export-int8": lambda: export("lcm", "int8"),
    "lcm-ours": lambda: ours("lcm", "int8"),
    "lcm-export-int8-vae-int8": lambda: export("lcm", "int8+vae-int8"),
    "lcm-ours-int8-vae-int8": lambda: ours("lcm", "int8+vae-int8"),
    "lcm-ours-fp32": lambda: ours("lcm", "fp32"),
    "lcm-diffusers": lambda: diffusers_run("lcm"),
}


def extrapolated(row: dict) -> float:
    """The 20-step total from a run of row['steps'] steps: measured total + the missing steps x s/step."""
    per_step_calls = row["unet_calls"] / row["steps"]
    return round(row["total_s"] + (STEPS - row["steps"]) * per_step_calls * row["unet_s_per_step"], 1)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    import os
    return f"{cpu}, {os.cpu_count()} cores, {', '.join(isa)}"


def report(results: dict) -> str:
    lines = [f"# Families at real scale (RANDOM weights), {date.today()}", "",
             f"Machine: {machine()}. `bench/families_scale.py`; every phase in its own process (peak RSS = VmHWM).",
             ""]
    lines += ["## Export", "", "| model | recipe | time s | peak RSS GB | graphs on disk GB | parity (min dB) |",
              "|---|---|---:|---:|---:|---:|"]
    for phase, model, recipe in (("sdxl-export", "SDXL", "fp32"), ("sdxl-export-int8", "SDXL", "int8"),
                                 ("sdxl-export-int8-weights", "SDXL", "int8-weights"),
                                 ("lcm-export", "LCM (SD 1.5)", "fp32"), ("lcm-export-int8", "LCM (SD 1.5)", "int8"),
                                 ("lcm-export-int8-vae-int8", "LCM (SD 1.5)", "int8, --vae-recipe int8")):
        r = results.get(phase)
        if r and "error" not in r:
            lines.append(f"| {model} | {recipe} | {r.get('export_s', '-')} | {r.get('peak_rss_gb', '-')} | "
                         f"{round(sum(r.get('size_gb', {}).values()), 2)} | {min(r.get('parity_db', {0: 0}).values())} |")
        elif r:
            lines.append(f"| {model} | {recipe} | failed: {r['error']} | | | |")
    lines += ["", "## Generation", "",
              "| model | runtime | size | steps timed | U-Net s/call | VAE decode s | total s (timed) | "
              f"{STEPS} steps s | peak RSS GB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for phase, label in (("sdxl-ours", f"edgesd onnxruntime {ARGS.sdxl_recipe}"),
                         ("sdxl-ours-openvino", "edgesd openvino fp32 (f32)"),
                         ("sdxl-ours-int8-weights", "edgesd onnxruntime int8-weights"),
                         ("sdxl-diffusers", "diffusers fp32"),
                         ("lcm-ours", "edgesd onnxruntime int8"),
                         ("lcm-ours-int8-vae-int8", "edgesd onnxruntime int8, int8 VAE decoder"),
                         ("lcm-ours-fp32", "edgesd onnxruntime fp32"),
                         ("lcm-diffusers", "diffusers fp32")):
        r = results.get(phase)
        if not r or "error" in r:
            continue
        model = "SDXL" if phase.startswith("sdxl") else "LCM"
        size = 1024 if model == "SDXL" else 512
        total = f"{extrapolated(r)}*" if r["steps"] < STEPS and model == "SDXL" else "-"
        lines.append(f"| {model} | {label} | {size}x{size} | {r['steps']} | {r['unet_s_per_step']} | "
                     f"{r['vae_decode_s']} | {r['total_s']} | {total} | {r['peak_rss_gb']} |")
    lines += ["", "\\* extrapolated: the timed total plus the missing steps at the measured U-Net time per call. "
              "SDXL: guidance 5, Euler; LCM: 4 steps, guidance 8.5 (its w embedding, no unconditional batch)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated, in order")
    parser.add_argument("--sdxl-steps", type=int, default=2, help="SDXL steps timed (the 20-step total is "
                        "extrapolated)")
    parser.add_argument("--sdxl-recipe", default="int8", help="the SDXL export edgesd generates with")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # a child process: run this phase only
    parser.add_argument("--out", type=Path, default=RESULTS / f"families-scale-{date.today()}.json")
    ARGS = parser.parse_args()
    if ARGS.phase:
        print(json.dumps(PHASES[ARGS.phase]()))
        return
    run_phases(Path(__file__), ARGS.phases.split(","), ARGS.out, report,
               ["--sdxl-steps", str(ARGS.sdxl_steps), "--sdxl-recipe", ARGS.sdxl_recipe])


def run_phases(script: Path, phases: list[str], out: Path, report, extra_argv: list[str] = ()) -> None:
    """Run each phase of `script` in its own process (`--phase NAME`, printing its JSON last), adding to the
    results in `out` (JSON) and its report (`report(results)`, .md) after each one."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    for phase in phases:
        print(f"== {phase}", flush=True)
        started = time.perf_counter()
        run = subprocess.run([sys.executable, str(script), "--phase", phase, *extra_argv], capture_output=True,
                             text=True)
        if run.returncode == 0:
            results[phase] = json.loads(run.stdout.strip().splitlines()[-1])
        else:
            reason = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1][:200]
            if run.returncode == -9:  # the kernel's OOM killer (nothing else here sends SIGKILL)
                reason = "killed by the kernel's out-of-memory killer (SIGKILL)"
                for partial in [*WORK.glob(".*.partial-*"), *WORK.glob(".*.recipe-*")]:  # what it left behind
                    shutil.rmtree(partial, ignore_errors=True)
            results[phase] = {"error": reason, "returncode": run.returncode,
                              "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(results[phase]), flush=True)
        results["machine"] = machine()
        out.write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(report(results))


ARGS = argparse.Namespace(sdxl_steps=2, sdxl_recipe="int8")

if __name__ == "__main__":
    main()
