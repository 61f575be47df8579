"""Each peer's own export of the SD 1.5 architecture with RANDOM weights (bench/work/sd15-random), cached.

    .venv/bin/python bench/peers/build.py [optimum-intel-fp32 optimum-onnx-fp32 ...]   # default: all

Each export runs its peer's own exporter in the peer's venv (bench/peers/make_venvs.sh) with HF_HUB_OFFLINE=1
and writes bench/work/peers/<name>/, renamed into place only when the exporter succeeded. Nothing is fetched
from a model hub: the hybrid int8 U-Net is calibrated on a list of prompts through optimum-intel's Python
API (its CLI wants a hub dataset).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
VENVS = BENCH / "venvs"
ORIGINAL = BENCH / "work" / "sd15-random"
PEERS = BENCH / "work" / "peers"
# The source every peer reads: ORIGINAL with its text encoder's keys under `text_model.`, as public SD
# checkpoints have them. Saved by transformers 5 they lack it, and transformers 4 (optimum's) would then
# leave the text encoder randomly initialised instead of loading it; stable-diffusion.cpp expects it too.
SRC = PEERS / "sd15-random"
# optimum-intel's hybrid quantization runs the fp32 pipeline (50 steps per prompt, its default) on these
# prompts and keeps HYBRID_SAMPLES U-Net inputs for the activation ranges.
HYBRID_PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor fox in the snow"]
HYBRID_SAMPLES = 32

HYBRID_SCRIPT = """
import sys
from pathlib import Path
from optimum.exporters.openvino.convert import export_tokenizer
from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig
src, out, samples, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
# int8 weight compression with a dataset = optimum-intel's hybrid mode: MatMul/Embedding weights int8,
# the U-Net's other layers static int8 (weights and activations)
config = OVWeightQuantizationConfig(bits=8, dataset=prompts, num_samples=samples)
pipe = OVStableDiffusionPipeline.from_pretrained(src, export=True, quantization_config=config)
pipe.save_pretrained(out)
# the CLI also writes the tokenizer as IR (OpenVINO GenAI reads it); save_pretrained does not
export_tokenizer(pipe.tokenizer, Path(out) / "tokenizer")
"""


def _cli(venv: str, *args: str) -> list[str]:
    return [str(VENVS / venv / "bin" / "optimum-cli"), *args]


def commands(name: str, out: Path) -> list[list[str]]:
    """The exporter command(s) that write peer build `name` into `out`."""
    ov = ("export", "openvino", "--model", str(SRC), "--task", "text-to-image")
    if name == "optimum-intel-fp32":
        return [_cli("optimum-intel", *ov, "--weight-format", "fp32", str(out))]
    if name == "optimum-intel-int8":
        return [_cli("optimum-intel", *ov, "--weight-format", "int8", str(out))]
    if name == "optimum-intel-int8-hybrid":
        python = str(VENVS / "optimum-intel" / "bin" / "python")
        return [[python, "-c", HYBRID_SCRIPT, str(SRC), str(out), str(HYBRID_SAMPLES), *HYBRID_PROMPTS]]
    if name == "optimum-onnx-fp32":
        return [_cli("optimum-onnx", "export", "onnx", "--model", str(SRC), "--task", "text-to-image", str(out))]
    raise SystemExit(f"error: unknown peer build '{name}'; known: {', '.join(BUILDS)}")


BUILDS = ("optimum-intel-fp32", "optimum-intel-int8", "optimum-intel-int8-hybrid", "optimum-onnx-fp32")


def source() -> Path:
    """SRC, made once from ORIGINAL (links to everything but the text encoder's weights)."""
    if (SRC / "model_index.json").is_file():
        return SRC
    if not (ORIGINAL / "model_index.json").is_file():
        sys.path.insert(0, str(BENCH))
        import recipes_backends

        recipes_backends.foundation("build")
    from safetensors.numpy import load_file, save_file

    partial = SRC.with_name(SRC.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "text_encoder").mkdir(parents=True)
    for item in ORIGINAL.iterdir():
        if item.name != "text_encoder":
            (partial / item.name).symlink_to(item)
    (partial / "text_encoder" / "config.json").symlink_to(ORIGINAL / "text_encoder" / "config.json")
    weights = load_file(ORIGINAL / "text_encoder" / "model.safetensors")
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()},
              partial / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    partial.rename(SRC)
    return SRC


def add_tokenizer_ir(out: Path) -> None:
    """The tokenizer IR OpenVINO GenAI needs, for an optimum-intel build cached without it."""
    if not out.name.startswith("optimum-intel") or (out / "tokenizer" / "openvino_tokenizer.xml").is_file():
        return
    script = ("import sys; from transformers import CLIPTokenizer; "
              "from optimum.exporters.openvino.convert import export_tokenizer; "
              "export_tokenizer(CLIPTokenizer.from_pretrained(sys.argv[1]), sys.argv[1])")
    subprocess.run([str(VENVS / "optimum-intel" / "bin" / "python"), "-c", script, str(out / "tokenizer")],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def build(name: str) -> Path:
    out = PEERS / name
    if (out / "model_index.json").is_file():
        add_tokenizer_ir(out)
        return out
    source()
    partial = out.with_name(name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    for cmd in commands(name, partial):
        if not Path(cmd[0]).exists():
            raise SystemExit(f"error: {cmd[0]} is missing; run bash bench/peers/make_venvs.sh")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"error: building {name} failed:\n{tail}")
    partial.rename(out)
    (out / "build_seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
    print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    for n in sys.argv[1:] or BUILDS:
        build(n)
