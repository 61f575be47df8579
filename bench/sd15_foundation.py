"""Foundation benchmark: export and 20-step generation on the SD 1.5 architecture with RANDOM weights.

    .venv/bin/python bench/sd15_foundation.py            # all phases, results in bench/results/
    .venv/bin/python bench/sd15_foundation.py --phase ours   # one phase (build, export, ours, diffusers)

Each phase runs in its own process so its peak RSS is its own. Random weights give
the real architecture's cost (FLOPs, memory) but no meaningful picture.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from torch_timing import ModuleTimer  # bench/ is on sys.path when a script of it runs

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
SRC = WORK / "sd15-random"
OUT = WORK / "sd15-random-onnx"
CONFIGS = HERE.parent.parent / "shared" / "reference-configs" / "sd15"
PROMPT = "a photograph of an astronaut riding a horse"
STEPS, SIZE, GUIDANCE, SEED = 20, 512, 7.5, 0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def phase_build() -> dict:
    from edgesd.export.tiny import build_random_sd

    start = time.perf_counter()
    if not (SRC / "model_index.json").exists():
        build_random_sd(SRC, seed=0, reference_config=CONFIGS)
    return {"build_s": round(time.perf_counter() - start, 1)}


def phase_export() -> dict:
    from edgesd.export import ExportOptions, export_model

    start = time.perf_counter()
    report = export_model(SRC, OUT, ExportOptions(overwrite=True))
    sizes = {p.parent.name: 0 for p in OUT.glob("*/model.onnx*")}
    for p in OUT.glob("*/model.onnx*"):
        sizes[p.parent.name] += p.stat().st_size
    return {
        "export_s": round(time.perf_counter() - start, 1),
        "export_peak_rss_gb": round(peak_rss_gb(), 2),
        "parity_db": {f"{r.component}.{r.output}": round(r.psnr_db, 1) for r in report.parity},
        "size_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
    }


def phase_ours() -> dict:
    import numpy as np

    import edgesd

    start = time.perf_counter()
    pipe = edgesd.Pipeline.load(OUT)
    load_s = time.perf_counter() - start
    latents = np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    result = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                  latents=latents, scheduler="euler")
    t = result.timings
    return {
        "load_s": round(load_s, 2),
        "text_encoder_s": t["text_encoder_s"],
        "unet_s_per_step": round(t["unet_s"] / t["unet_evaluations"], 3),
        "vae_decode_s": t["vae_decoder_s"],
        "total_s": t["total_s"],
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def phase_diffusers() -> dict:
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(SRC, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    timer = ModuleTimer()
    timer.watch(pipe.text_encoder, "text_encoder")
    timer.watch(pipe.unet, "unet")
    timer.watch(pipe.vae.decoder, "vae_decoder")
    seconds, calls = timer.seconds, timer.calls
    latents = torch.from_numpy(np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 8, SIZE // 8))
                               .astype(np.float32))
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE, latents=latents)
    return {
        "load_s": round(load_s, 2),
        "text_encoder_s": round(seconds["text_encoder"], 3),
        "unet_s_per_step": round(seconds["unet"] / calls["unet"], 3),
        "vae_decode_s": round(seconds["vae_decoder"], 3),
        "total_s": round(time.perf_counter() - start, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "torch_threads": torch.get_num_threads(),
    }


PHASES = {"build": phase_build, "export": phase_export, "ours": phase_ours, "diffusers": phase_diffusers}


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")))
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e6, 1), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=list(PHASES))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase:
        print(json.dumps(PHASES[args.phase]()))
        return
    WORK.mkdir(exist_ok=True)
    results = {"what": "SD 1.5 architecture, RANDOM weights, 512x512, 20 Euler steps, guidance 7.5 (batch-2 U-Net)",
               "date": date.today().isoformat(), "machine": machine()}
    for phase in PHASES:
        print(f"[bench] {phase} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--phase", phase], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[bench] {phase}: {results[phase]}", file=sys.stderr, flush=True)
    name = f"foundation-{platform.node() or 'machine'}-{results['date']}"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results" / f"{name}.md").write_text(markdown(results))
    update_readme(results, f"bench/results/{name}.json")
    print(markdown(results))


def markdown(r: dict) -> str:
    o, d, e = r["ours"], r["diffusers"], r["export"]
    m = r["machine"]
    rows = [
        ("text encoder (s)", o["text_encoder_s"], d["text_encoder_s"]),
        ("U-Net per step, batch 2 (s)", o["unet_s_per_step"], d["unet_s_per_step"]),
        ("VAE decode (s)", o["vae_decode_s"], d["vae_decode_s"]),
        ("20-step total (s)", o["total_s"], d["total_s"]),
        ("load (s)", o["load_s"], d["load_s"]),
        ("peak RSS (GB)", o["peak_rss_gb"], d["peak_rss_gb"]),
    ]
    lines = [f"# {r['what']}", "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; "
             f"onnxruntime {m['onnxruntime']}; {r['date']}.", "",
             f"Export (edgesd export, fp32 ONNX): {e['export_s']} s, peak RSS {e['export_peak_rss_gb']} GB; "
             f"sizes MB {e['size_mb']}; parity dB {e['parity_db']}.", "",
             "| | edgesd, ONNX Runtime CPU fp32 | diffusers, PyTorch CPU fp32 |", "|---|---:|---:|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    return "\n".join(lines) + "\n"


def update_readme(r: dict, source: str) -> None:
    """Rewrite the README's performance section (between the perf markers) from these results."""
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    start, end = "<!-- perf:start -->", "<!-- perf:end -->"
    if start not in text or end not in text:
        return
    o, d, e, m = r["ours"], r["diffusers"], r["export"], r["machine"]
    section = f"""{start}
Measured {r['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB (`{source}`), in one run:
{r['what']}.

| | edgesd, ONNX Runtime CPU fp32 | diffusers, PyTorch CPU fp32 |
|---|---:|---:|
| text encoder (s) | {o['text_encoder_s']:.2f} | {d['text_encoder_s']:.2f} |
| U-Net per step (s) | {o['unet_s_per_step']:.2f} | {d['unet_s_per_step']:.2f} |
| VAE decode (s) | {o['vae_decode_s']:.1f} | {d['vae_decode_s']:.1f} |
| 20 steps, total (s) | {o['total_s']:.0f} | {d['total_s']:.0f} |
| load (s) | {o['load_s']:.0f} | {d['load_s']:.0f} |
| peak RSS (GB) | {o['peak_rss_gb']:.1f} | {d['peak_rss_gb']:.1f} |

Export (`edgesd export`, fp32, four graphs with parity checks): {e['export_s']:.0f} s, peak RSS
{e['export_peak_rss_gb']:.1f} GB.
{end}"""
    readme.write_text(text[: text.index(start)] + section + text[text.index(end) + len(end):])


if __name__ == "__main__":
    main()
