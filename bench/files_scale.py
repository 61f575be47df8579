"""The files users hold, at real scale with RANDOM weights: an SD 1.5 single-file checkpoint exported with the
shipped configs, a LoRA added at load (and switched), the SD 1.5 VAE decoding 1024x1024 with and without
tiling, and TAESD decoding 512x512.

    .venv/bin/python bench/files_scale.py                          # every phase, results in bench/results/
    .venv/bin/python bench/files_scale.py --phases vae-1024-off,vae-1024-on

Each phase runs in its own process (peak RSS = its VmHWM); built models and exports are cached in bench/work.
Architectures: ../shared/reference-configs sd15 and taesd; the weights are random, so the figures are time and
memory, not picture quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

from families_scale import CONFIGS, RESULTS, WORK, build, machine, peak_rss_gb, run_phases, src

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.ldm_writer / tests.lora_files

SINGLE_FILE = WORK / "sd15-random.safetensors"
EXPORT = WORK / "sd15-random-single-file-onnx"
TAESD = WORK / "taesd-random"
TAESD_EXPORT = WORK / "taesd-random-onnx"
LORAS = [WORK / "sd15-random-lora-a.safetensors", WORK / "sd15-random-lora-b.safetensors"]
LORA_RANK = 16


def single_file() -> dict:
    """The random SD 1.5 folder written as one fp16 LDM checkpoint, as A1111 users hold it."""
    import torch

    from tests.ldm_writer import write_single_file

    if SINGLE_FILE.is_file():
        return {"cached": True, "size_gb": round(SINGLE_FILE.stat().st_size / 1e9, 2)}
    start = time.perf_counter()
    write_single_file(src("sd15"), SINGLE_FILE, torch.float16)
    return {"write_s": round(time.perf_counter() - start, 1), "size_gb": round(SINGLE_FILE.stat().st_size / 1e9, 2),
            "peak_rss_gb": peak_rss_gb()}


def export_single_file() -> dict:
    """`edgesd export sd15-random.safetensors OUT`: family and configs from the file's keys (no --config)."""
    from edgesd.export import ExportOptions, export_model

    if (EXPORT / "edgesd.json").is_file():
        return {"cached": True, **json.loads((EXPORT / "export-bench.json").read_text())}
    start = time.perf_counter()
    report = export_model(SINGLE_FILE, EXPORT, ExportOptions(overwrite=True))
    result = {"export_s": round(time.perf_counter() - start, 1), "peak_rss_gb": peak_rss_gb(),
              "family": json.loads((EXPORT / "edgesd.json").read_text())["family"],
              "parity_min_db": round(min(r.psnr_db for r in report.parity), 1),
              "weights_mapped": {c: len(json.loads((EXPORT / c / "weights.json").read_text())["weights"])
                                 for c in ("text_encoder", "unet")}}
    (EXPORT / "export-bench.json").write_text(json.dumps(result))
    return result


def _decoder(path: Path):
    from edgesd.backends import RuntimeOptions, load_graph
    from edgesd.graphs import VAE_DECODER

    return load_graph(path, VAE_DECODER, RuntimeOptions(backend="onnxruntime"))


def vae_decode(size: int, tiling: str, folder: Path = EXPORT, sample_size: int = 512) -> dict:
    """One picture's VAE decode (1, 4, size/8, size/8) -> (1, 3, size, size), as the runtime decodes it."""
    import numpy as np

    from edgesd.tiling import decode_latents

    graph = _decoder(folder / "vae_decoder" / "model.onnx")
    z = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)

    def decode(t):
        return graph.run({"latent_sample": t})["sample"]

    decode_latents(z[:, :, :8, :8], decode, sample_size, 8, "off")  # warm-up on a small tile
    start = time.perf_counter()
    out = decode_latents(z, decode, sample_size, 8, tiling)
    return {"decode_s": round(time.perf_counter() - start, 2), "shape": list(out.shape), "peak_rss_gb": peak_rss_gb()}


def taesd_export() -> dict:
    import torch
    from diffusers import AutoencoderTiny

    from edgesd.export import export_model

    if (TAESD_EXPORT / "edgesd.json").is_file():
        return {"cached": True}
    torch.manual_seed(0)
    AutoencoderTiny.from_config(AutoencoderTiny.load_config(CONFIGS / "taesd")).save_pretrained(TAESD)
    start = time.perf_counter()
    export_model(TAESD, TAESD_EXPORT)
    return {"export_s": round(time.perf_counter() - start, 1)}


def write_loras() -> dict:
    """Two random kohya LoRAs (rank 16) over the U-Net's attention / feed-forward layers and resnet conv1, and
    the text encoder's attention and MLP."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from tests.lora_files import write_kohya_lora

    if all(p.is_file() for p in LORAS):
        return {"cached": True}
    unet = UNet2DConditionModel.from_pretrained(src("sd15") / "unet")
    text = CLIPTextModel.from_pretrained(src("sd15") / "text_encoder")
    for seed, path in enumerate(LORAS):
        write_kohya_lora(path, unet, {"lora_te": text}, rank=LORA_RANK, alpha=LORA_RANK / 2, seed=seed, std=0.01)
    return {"size_mb": round(LORAS[0].stat().st_size / 1e6, 1)}


def load_and_step(loras: list) -> dict:
    """Load time (with `loras` added as the graphs load) and one 512x512 step; peak memory of both."""
    import edgesd

    start = time.perf_counter()
    pipe = edgesd.Pipeline.load(EXPORT, loras=loras)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    pipe("a photograph of an astronaut riding a horse", num_inference_steps=1, width=512, height=512, seed=1)
    return {"load_s": round(load_s, 2), "one_step_512_s": round(time.perf_counter() - start, 2),
            "peak_rss_gb": peak_rss_gb()}


def lora_switch() -> dict:
    """What switching LoRAs costs (`Pipeline.with_loras`: the text encoder and U-Net load again, the VAE is
    kept); while it runs the old pipeline is still held, as `pipe = pipe.with_loras(...)` holds it."""
    import edgesd

    pipe = edgesd.Pipeline.load(EXPORT, loras=[(LORAS[0], 0.8)])
    switches = []
    for path in (LORAS[1], LORAS[0], LORAS[1]):
        start = time.perf_counter()
        pipe = pipe.with_loras([(path, 0.8)])
        switches.append(round(time.perf_counter() - start, 2))
    start = time.perf_counter()
    pipe = pipe.with_loras([])
    return {"switch_s": switches, "lora_off_s": round(time.perf_counter() - start, 2), "peak_rss_gb": peak_rss_gb()}


PHASES = {
    "sd15-build": lambda: build("sd15"),
    "sd15-single-file": single_file,
    "sd15-export-single-file": export_single_file,
    "vae-1024-off": lambda: vae_decode(1024, "off"),
    "vae-1024-on": lambda: vae_decode(1024, "on"),
    "vae-512": lambda: vae_decode(512, "off"),
    "taesd-export": taesd_export,
    "taesd-512": lambda: vae_decode(512, "off", TAESD_EXPORT),
    "taesd-1024": lambda: vae_decode(1024, "off", TAESD_EXPORT),
    "lora-write": write_loras,
    "load": lambda: load_and_step([]),
    "lora-load": lambda: load_and_step([(LORAS[0], 0.8)]),
    "lora-switch": lora_switch,
}


def report(results: dict) -> str:
    def get(phase, key, default="-"):
        return results.get(phase, {}).get(key, results.get(phase, {}).get("error", default))

    lines = [f"# Single files, LoRA, TAESD and tiled VAE at real scale (RANDOM weights), {date.today()}", "",
             f"Machine: {machine()}. `bench/files_scale.py`; every phase in its own process (peak RSS = VmHWM).", "",
             "## SD 1.5 single-file checkpoint (fp16, LDM layout) -> ONNX fp32, shipped configs", "",
             f"- file: {get('sd15-single-file', 'size_gb')} GB; `edgesd export` {get('sd15-export-single-file', 'export_s')} s, "
             f"peak RSS {get('sd15-export-single-file', 'peak_rss_gb')} GB, family {get('sd15-export-single-file', 'family')}, "
             f"parity min {get('sd15-export-single-file', 'parity_min_db')} dB, LoRA-able weights mapped "
             f"{get('sd15-export-single-file', 'weights_mapped')}", "",
             "## VAE decode (one picture, ONNX Runtime CPU)", "",
             "| decoder | picture | tiling | decode s | peak RSS GB |", "|---|---|---|---:|---:|"]
    for phase, decoder, size, tiling in (("vae-512", "SD 1.5 VAE", 512, "off"), ("vae-1024-off", "SD 1.5 VAE", 1024, "off"),
                                         ("vae-1024-on", "SD 1.5 VAE", 1024, "on (512 tiles, 1/4 overlap)"),
                                         ("taesd-512", "TAESD", 512, "off"), ("taesd-1024", "TAESD", 1024, "off")):
        lines.append(f"| {decoder} | {size}x{size} | {tiling} | {get(phase, 'decode_s')} | {get(phase, 'peak_rss_gb')} |")
    lines += ["", f"## LoRA at load (SD 1.5 fp32 export, ONNX Runtime; kohya rank {LORA_RANK} over the U-Net attention, "
              "feed-forward and resnet conv1 plus the text encoder: 241 layers, 1.76 GB of weights changed)", "",
              "| what | seconds | peak RSS GB |", "|---|---:|---:|",
              f"| load, no LoRA (peak: with one 512x512 step) | {get('load', 'load_s')} | {get('load', 'peak_rss_gb')} |",
              f"| one 512x512 step (text encoder, U-Net, VAE) | {get('load', 'one_step_512_s')} | |",
              f"| load with one LoRA (peak: with one 512x512 step) | {get('lora-load', 'load_s')} | "
              f"{get('lora-load', 'peak_rss_gb')} |",
              f"| one 512x512 step with it | {get('lora-load', 'one_step_512_s')} | |",
              f"| switch to another LoRA (`with_loras`, old pipeline held), 3 times | {get('lora-switch', 'switch_s')} | "
              f"{get('lora-switch', 'peak_rss_gb')} |",
              f"| back to no LoRA | {get('lora-switch', 'lora_off_s')} | |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated, in order")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / f"files-scale-{date.today()}.json")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase]()))
        return
    run_phases(Path(__file__), args.phases.split(","), args.out, report)


if __name__ == "__main__":
    main()
