"""The `edgesd` command: export, generate, serve, info."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .backends.base import (BACKENDS, CACHE_MODES, DEVICE_ARENAS, GUIDANCE_BATCHES, IO_BINDINGS, MEMORY_MODES, ORT_OPTIMIZATIONS, OV_HINTS,
                            OV_PRECISIONS, OV_SHAPES, RuntimeOptions)
from .cache import DEFAULT_MAX_GB
from .errors import Cancelled, EdgesdError
from .lora import LoraSpec
from .noise import NOISE_GENERATORS
from .request import DEFAULT_MAX_PIXELS
from .tiling import TILING_MODES


class _Command(click.Group):
    """Turns EdgesdError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgesdError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except Cancelled as e:
            click.echo(f"cancelled: {e}", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Command)
@click.version_option(package_name="edgesd")
def main():
    """Stable Diffusion on CPUs: export checkpoints to ONNX and generate images."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-vae-encoder", is_flag=True, help="Skip the VAE encoder (only img2img needs it).")
@click.option("--recipe", default="fp32", show_default=True,
              help="Precision: fp32, fp16 (weights stored in half precision), int8-weights, int4-weights "
                   "(MatMul weights in 4 bits), int8 (static int8 U-Net, calibrated; int8 weights elsewhere), "
                   "int8-hybrid (openvino only: U-Net MatMul weights int8, convolutions static int8).")
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "openvino"]),
              help="Graph format: ONNX, or OpenVINO IR (openvino_model.xml + .bin, written with NNCF).")
@click.option("--text-encoder-recipe", "text_encoder_recipe", default=None, help="Recipe for the text encoders only.")
@click.option("--unet-recipe", "unet_recipe", default=None, help="Recipe for the U-Net only.")
@click.option("--vae-recipe", "vae_recipe", default=None, help="Recipe for the VAE decoder and encoder only.")
@click.option("--vae", "vae", type=click.Path(path_type=Path), default=None,
              help="Replace the model's VAE: a VAE .safetensors file (diffusers or LDM names) or a diffusers vae/ folder.")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="Single-file SRC: a diffusers folder whose configs describe it (default: the shipped ones of "
                   "its family, found from its keys).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Merge a LoRA (.safetensors, kohya/A1111 or diffusers/PEFT) into the weights; repeatable.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="Single-file SRC: what the U-Net predicts where the file cannot say (SD 2.x 768-v: v_prediction).")
@click.option("--calibration-prompts", type=click.Path(path_type=Path), default=None,
              help="int8: a text file of calibration prompts, one per line (default: built-in ones).")
@click.option("--calibration-size", type=int, default=None,
              help="int8: how many built-in calibration prompts to run (10 steps each; default 4 for onnx, 8 for openvino).")
@click.option("--allow-lossy", is_flag=True, help="Write the export even below its recipe's fidelity threshold.")
@click.option("--attention", type=click.Choice(["fused", "unfused"]), default=None,
              help="fused (default for ONNX): each attention as one onnxruntime MultiHeadAttention node (faster, "
                   "less memory); unfused (default for OpenVINO IR, which fuses them itself): torch's nodes.")
@click.option("--default-steps", type=int, default=None, help="Record the model's own default step count.")
@click.option("--default-guidance", type=float, default=None, help="Record the model's own default guidance.")
def export(src: Path, out: Path, overwrite: bool, no_vae_encoder: bool, recipe: str, fmt: str,
           text_encoder_recipe: str | None, unet_recipe: str | None, vae_recipe: str | None, vae: Path | None,
           config: Path | None, loras: tuple[str, ...], prediction_type: str | None, calibration_prompts: Path | None,
           calibration_size: int | None, allow_lossy: bool, attention: str | None, default_steps: int | None,
           default_guidance: float | None):
    """Export SRC, a diffusers-layout SD folder or a single-file .safetensors checkpoint, to ONNX graphs (or
    OpenVINO IR) in OUT. SRC may also be an fp32 or fp16 ONNX export of edgesd (the embedded model's folder,
    say): its graphs are then the reference, written again in the recipe and format asked for."""
    if not src.exists():  # said at once, before seconds of importing torch
        raise EdgesdError(f"source '{src}' does not exist",
                          "pass a diffusers folder, a .safetensors checkpoint or an fp32/fp16 edgesd export")
    import signal

    def on_sigterm(signum, frame):  # as Ctrl-C: the export's cleanup runs and leaves no partial folder
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        from edgesd.export import STAGES, ExportFidelityError, ExportOptions, ExportParityError, export_model
        from edgesd.export.recipes import RECIPES
    except ImportError as e:
        raise EdgesdError(f"the exporter needs the 'export' extra ({e.name} is not installed)",
                          "pip install 'edgesd[export]' -c constraints.txt") from None
    # text_encoder_2 only for SDXL: its bar may fill a stage early
    stages = [s for s in STAGES if not (no_vae_encoder and s == "vae_encoder") and s != "text_encoder_2"]
    from .model import GenerationDefaults

    defaults = None
    if default_steps is not None or default_guidance is not None:
        if default_steps is not None and default_steps < 1:
            raise EdgesdError(f"--default-steps must be >= 1, got {default_steps}")
        if default_guidance is not None and default_guidance < 0:
            raise EdgesdError(f"--default-guidance must be >= 0, got {default_guidance}")
        base = GenerationDefaults()
        defaults = GenerationDefaults(default_steps or base.num_inference_steps,
                                      base.guidance_scale if default_guidance is None else default_guidance)
    if vae is not None and not vae.exists() and str(vae) in RECIPES:
        raise EdgesdError(f"--vae takes a VAE file or folder; '{vae}' is a recipe", f"use --vae-recipe {vae}")
    overrides = {c: r for c, r in (("text_encoder", text_encoder_recipe), ("unet", unet_recipe),
                                   ("vae_decoder", vae_recipe), ("vae_encoder", vae_recipe)) if r is not None}
    options = ExportOptions(overwrite=overwrite, with_vae_encoder=not no_vae_encoder, recipe=recipe, format=fmt,
                            component_overrides=overrides, allow_lossy=allow_lossy,
                            calibration_prompts=_read_prompts(calibration_prompts) if calibration_prompts else None,
                            calibration_size=calibration_size, defaults=defaults, config=config,
                            prediction_type=prediction_type, vae=vae, attention=attention,
                            loras=tuple(LoraSpec.parse(text) for text in loras))
    with click.progressbar(length=len(stages), label="export", file=sys.stderr,
                           item_show_func=lambda s: s) as bar:
        def on_stage(name: str) -> None:
            bar.update(0 if name == stages[0] else 1, name)  # a stage starting ends the one before

        try:
            report = export_model(src, out, options, on_stage)
        except ExportParityError as e:
            bar.render_finish()
            _print_parity(e.report.parity)
            raise
        except ExportFidelityError as e:
            bar.render_finish()
            _print_parity(e.report.parity)
            _print_fidelity(e.report.fidelity)
            raise
        bar.update(1, "done")
    for note in report.notes:
        click.echo(f"note: {note}")
    _print_parity(report.parity)
    if report.fidelity is not None:  # a VAE exported on its own has no pictures to compare
        _print_fidelity(report.fidelity)
    click.echo(f"wrote {out} in {report.seconds:.1f} s")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
def deepcache(model: Path):
    """Add DeepCache's graphs to the exported ONNX model MODEL (once), for --deepcache-interval N."""
    try:
        from .export.deepcache import add_deepcache
    except ImportError as e:
        raise EdgesdError(f"cutting DeepCache's graphs needs the 'export' extra ({e.name} is not installed)",
                          "pip install -c constraints.txt 'edgesd[export]'") from None
    _print_parity([add_deepcache(model)])
    click.echo(f"added DeepCache's graphs to {model}: generate with --deepcache-interval 2 (or 3, ...)")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--levels", default=1, show_default=True, type=int,
              help="Merge the self-attention of this many levels from full resolution (1: ToMe for SD's default).")
def tome(model: Path, levels: int):
    """Add the token-merging U-Net (ToMe for SD) to the exported ONNX model MODEL (once), for --token-merging R."""
    try:
        from .export.tome import add_tome
    except ImportError as e:
        raise EdgesdError(f"making the token-merging U-Net needs the 'export' extra ({e.name} is not installed)",
                          "pip install -c constraints.txt 'edgesd[export]'") from None
    _print_parity([add_tome(model, levels)])
    click.echo(f"added the token-merging U-Net to {model}: generate with --token-merging 0.5 (or 0.3, ...)")


def _read_prompts(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise EdgesdError(f"calibration prompts file '{path}' does not exist", "pass a text file, one prompt per line")
    try:
        prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError:
        raise EdgesdError(f"calibration prompts file '{path}' is not UTF-8 text", "save it as UTF-8") from None
    if not prompts:
        raise EdgesdError(f"calibration prompts file '{path}' has no prompts", "write one prompt per line")
    return prompts


def _print_fidelity(report) -> None:
    click.echo(f"{'graph':<14}{'recipe':<14}{'output':<20}{'PSNR dB':>9}{'cosine':>10}{'MB':>9}{'fp32 MB':>9}")
    for g in report.graphs:
        click.echo(f"{g.component:<14}{g.recipe:<14}{g.output:<20}{g.psnr_db:>9.1f}{g.cosine:>10.5f}"
                   f"{g.size_mb:>9.1f}{g.fp32_size_mb:>9.1f}")
    if report.image_psnr_db:
        values = ", ".join(f"{v:.1f}" for v in report.image_psnr_db)
        click.echo(f"images vs fp32: PSNR {values} dB; worst {report.worst_image_psnr_db:.1f}, need >= "
                   f"{report.threshold_db:.1f}: {'ok' if report.passed else 'FAIL'}")


def _print_parity(results) -> None:
    if not results:  # a re-export of an edgesd export traces nothing
        return
    click.echo(f"{'graph':<14}{'output':<20}{'PSNR dB':>9}{'max |err|':>12}{'min dB':>8}  result")
    for r in results:
        click.echo(f"{r.component:<14}{r.output:<20}{r.psnr_db:>9.1f}{r.max_abs_error:>12.2e}"
                   f"{r.threshold_db:>8.1f}  {'ok' if r.passed else 'FAIL'}")


def _scheduler_choice(value: str | None):
    """A short name, or a path to a diffusers scheduler_config.json."""
    if value is None or not value.endswith(".json"):
        return value
    from .model import read_json

    return read_json(Path(value), "scheduler config")


# the model a command loads, as generate and batch take it
_MODEL_OPTIONS = [
    click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
                 help="Model folder (default: the embedded model)."),
    click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                 help="Add a LoRA to the fp32/fp16 graphs' weights as they load (no re-export); repeatable."),
    click.option("--vae-decoder", type=click.Path(path_type=Path), default=None,
                 help="Decode with this exported decoder (TAESD: edgesd export TAESD_DIR OUT) instead of the model's VAE."),
]


# RuntimeOptions' fields as options of generate and batch, one to one
_RUNTIME_OPTIONS = [
    click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKENDS),
                 help="auto: openvino for a folder of OpenVINO IR graphs, else onnxruntime."),
    click.option("--threads", default=None, type=int, help="Threads per graph (default: one per core)."),
    click.option("--memory", default="fast", show_default=True, type=click.Choice(MEMORY_MODES),
                 help="low: load each graph for its stage only (one component in memory at a time; slower starts)."),
    click.option("--guidance-batch", default="auto", show_default=True, type=click.Choice(GUIDANCE_BATCHES),
                 help="split: a guided step's negative and positive halves as two U-Net calls (same pictures, less "
                      "memory, faster on CPUs); joint: one call of twice the batch; auto: split on the CPU."),
    click.option("--cache", default="on", show_default=True, type=click.Choice(CACHE_MODES),
                 help="Keep optimised (onnxruntime) or compiled (openvino) graphs: the next start is faster."),
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                 help="The cache's folder (default: $EDGESD_CACHE_DIR, else the user's cache folder / edgesd)."),
    click.option("--cache-max-gb", default=DEFAULT_MAX_GB, show_default=True, type=float,
                 help="The most the cache keeps; past it the least recently used entries are removed."),
    click.option("--provider", default="cpu", show_default=True,
                 help="onnxruntime: execution providers, comma-separated in order of preference (e.g. openvino,cpu)."),
    click.option("--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
                 help="onnxruntime: an option of the first provider (repeatable)."),
    click.option("--component-provider", "component_providers", multiple=True, metavar="COMPONENT=PROVIDERS",
                 help="onnxruntime: run one graph on other providers than --provider's, e.g. text_encoder=cpu "
                      "(repeatable; text_encoder places every text encoder)."),
    click.option("--device-arena", default="auto", show_default=True, type=click.Choice(DEVICE_ARENAS),
                 help="onnxruntime, cuda: per-stage, each graph gives its free memory back after its part of a "
                      "picture (the U-Net after the last step); per-run, after each run; shared, one memory arena "
                      "for every graph of the process; per-graph, arenas kept as they grew; auto: per-stage on "
                      "cuda, per-graph elsewhere."),
    click.option("--ort-optimization", default="all", show_default=True, type=click.Choice(ORT_OPTIMIZATIONS),
                 help="onnxruntime: graph optimisation level."),
    click.option("--io-binding", default="auto", show_default=True, type=click.Choice(IO_BINDINGS),
                 help="onnxruntime: on a GPU provider, keep outputs and the repeated inputs in its memory."),
    click.option("--device", default="CPU", show_default=True, help="openvino: device (CPU, GPU, NPU, AUTO, ...)."),
    click.option("--ov-hint", default="latency", show_default=True, type=click.Choice(OV_HINTS),
                 help="openvino: performance hint."),
    click.option("--ov-precision", default="f32", show_default=True, type=click.Choice(OV_PRECISIONS),
                 help="openvino: inference precision; device-default lets a CPU with bf16 use it (faster, not equal)."),
    click.option("--ov-shapes", default="static", show_default=True, type=click.Choice(OV_SHAPES),
                 help="openvino: compile for the requested size and batch (static) or for any (dynamic)."),
]


def _runtime_options(command):
    for option in reversed(_MODEL_OPTIONS + _RUNTIME_OPTIONS):
        command = option(command)
    return command


def _runtime_options_only(command):
    for option in reversed(_RUNTIME_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.argument("prompt", required=False)
@click.option("--from", "from_png", type=click.Path(path_type=Path), default=None,
              help="Re-run the parameters a PNG carries (edgesd's or A1111's); options given here override them.")
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--prompt-2", "prompt_2", default=None, help="SDXL: the prompt for the second text encoder.")
@click.option("--negative-2", "negative_2", default=None, help="SDXL: the negative prompt for the second encoder.")
@click.option("--steps", default=None, type=int, help="Denoising steps (default: the model's, usually 20).")
@click.option("--guidance", default=None, type=float,
              help="Classifier-free guidance scale (default: the model's, usually 7.5).")
@click.option("--guidance-rescale", default=0.0, show_default=True, type=float,
              help="0-1: rescale guided predictions towards the conditional one's spread (Lin et al. 2023).")
@click.option("--guidance-cutoff", default=1.0, show_default=True, type=float,
              help="(0, 1]: guide only this share of the steps (the first ones); the rest run at half the U-Net "
                   "batch. Faster, a different picture.")
@click.option("--deepcache-interval", default=1, show_default=True, type=int,
              help="DeepCache: the whole U-Net every N-th step, its shallow path on the kept deep features between "
                   "(the model needs `edgesd deepcache MODEL` once). Faster, a different picture.")
@click.option("--token-merging", default=0.0, show_default=True, type=float,
              help="ToMe: merge this share of the full-resolution tokens (e.g. 0.5) in each self-attention (the "
                   "model needs `edgesd tome MODEL` once). Faster, a different picture.")
@click.option("--seed", default=None, type=int, help="Random seed (default: random, printed).")
@click.option("--width", default=None, type=int, help="Image width (default: the model's).")
@click.option("--height", default=None, type=int, help="Image height (default: the model's).")
@click.option("--scheduler", default=None, help="Sampler name, 'list', or a scheduler_config.json.")
@click.option("--noise", "noise_generator", default="numpy", show_default=True, type=click.Choice(NOISE_GENERATORS),
              help="Random generator the seed drives; torch-cpu draws torch's CPU randn, so diffusers seeds match.")
@click.option("--eta", default=None, type=float,
              help="DDIM's noise level, 0 (default) to 1; TCD's gamma (default 0.3).")
@click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
              help="img2img: start from this picture (PNG, JPEG, ...).")
@click.option("--strength", default=None, type=float,
              help="img2img / inpainting: how much of the schedule to run, (0, 1] (default 0.8; inpainting 1).")
@click.option("--mask", "mask_path", type=click.Path(path_type=Path), default=None,
              help="Inpainting (with --image): white repaints, black keeps.")
@click.option("--vae-tiling", default="auto", show_default=True, type=click.Choice(TILING_MODES),
              help="Decode/encode in overlapping tiles of the VAE's sample size; auto: from 4 tiles and 1024x1024 pixels.")
@click.option("--vae-tile-size", default=None, type=int,
              help="With --vae-tiling: a tile's side in pixels, a multiple of 64 (default: the VAE's sample size); "
                   "smaller tiles, less memory.")
@_runtime_options
@click.option("--count", default=1, show_default=True, type=int, help="Images to generate.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=int,
              help="Refuse a call whose pictures x width x height exceed this (checked before any memory is used).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("edgesd.png"), show_default=True,
              help="PNG path; with --count > 1, NAME-1.png, NAME-2.png, ...")
def generate(prompt, from_png, model_dir, negative, prompt_2, negative_2, steps, guidance, guidance_rescale,
             guidance_cutoff, deepcache_interval, token_merging, seed,
             width, height, scheduler, noise_generator, eta, image_path, strength, mask_path, loras, vae_decoder,
             vae_tiling, vae_tile_size, count, max_pixels, output, **runtime_options):
    """Generate an image from PROMPT (or from the parameters of a picture: --from PNG)."""
    from .schedulers import A1111_OF, SAMPLERS

    if from_png is not None:  # the picture's parameters, then what the command line gives over them
        given = {name for name in click.get_current_context().params
                 if click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        values = _saved_parameters(from_png, given, dict(
            prompt=prompt, negative=negative, prompt_2=prompt_2, negative_2=negative_2, steps=steps,
            guidance=guidance, guidance_rescale=guidance_rescale, guidance_cutoff=guidance_cutoff,
            deepcache_interval=deepcache_interval, token_merging=token_merging, seed=seed, width=width, height=height, scheduler=scheduler,
            noise_generator=noise_generator, strength=strength, vae_tiling=vae_tiling, vae_tile_size=vae_tile_size))
        (prompt, negative, prompt_2, negative_2, steps, guidance, guidance_rescale, guidance_cutoff,
         deepcache_interval, token_merging, seed, width, height, scheduler, noise_generator, strength, vae_tiling,
         vae_tile_size) = values.values()
    if prompt is None:
        raise EdgesdError("no prompt given", "pass PROMPT, or --from PNG to re-run a picture's parameters")

    if scheduler == "list":
        a1111 = A1111_OF
        rows = [("name", "A1111 name", "diffusers class", "description")]
        rows += [(name, a1111.get(name, ""), cls, text) for name, (cls, _, text) in SAMPLERS.items()]
        widths = [max(len(r[i]) for r in rows) + 2 for i in range(3)]
        for row in rows:
            click.echo("".join(cell.ljust(w) for cell, w in zip(row, widths)) + row[3])
        return
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise EdgesdError(f"output '{output}' is not a .png path", "name the output NAME.png")
    if not output.parent.is_dir():
        raise EdgesdError(f"the folder '{output.parent}' for the output does not exist", "create it first")
    if count < 1:
        raise EdgesdError(f"--count must be >= 1, got {count}")
    from .images import check_writable, open_picture, save_png

    check_writable(output)
    from .pipeline import Pipeline

    choice = _scheduler_choice(scheduler)
    image = open_picture(image_path, max_pixels) if image_path is not None else None
    mask = open_picture(mask_path, max_pixels, "mask") if mask_path is not None else None
    pipe = Pipeline.load(model_dir, _options(**runtime_options), vae_decoder=vae_decoder,
                         loras=[LoraSpec.parse(text) for text in loras])
    bar_length = steps or pipe.defaults.num_inference_steps
    with click.progressbar(length=bar_length, label="denoising", file=sys.stderr) as bar:
        def on_step(i: int, n: int) -> None:
            bar.length = n  # PLMS evaluates the U-Net steps + 1 times
            bar.update(1)

        result = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                      guidance_rescale=guidance_rescale, guidance_cutoff=guidance_cutoff,
                      deepcache_interval=deepcache_interval, token_merging=token_merging, width=width, height=height, seed=seed, num_images_per_prompt=count, scheduler=choice,
                      callback=on_step, noise_generator=noise_generator, eta=eta, image=image,
                      strength=strength, mask_image=mask, prompt_2=prompt_2, negative_prompt_2=negative_2,
                      vae_tiling=vae_tiling, vae_tile_size=vae_tile_size, max_pixels=max_pixels)
    for warning in result.warnings:
        click.echo(f"note: {warning}", err=True)
    paths = [output] if count == 1 else [output.with_name(f"{output.stem}-{i + 1}.png") for i in range(count)]
    for image, path in zip(result.images, paths):
        save_png(image, path, result.parameters)
        click.echo(f"wrote {path} (seed {result.seed})")


# generate's options -> the Pipeline arguments a picture's parameters name (images.read_parameters)
_SAVED = {"prompt": "prompt", "negative": "negative_prompt", "prompt_2": "prompt_2", "negative_2": "negative_prompt_2",
          "steps": "num_inference_steps", "guidance": "guidance_scale", "guidance_rescale": "guidance_rescale",
          "guidance_cutoff": "guidance_cutoff", "deepcache_interval": "deepcache_interval",
          "token_merging": "token_merging", "seed": "seed",
          "width": "width", "height": "height", "scheduler": "scheduler", "noise_generator": "noise_generator", "strength": "strength",
          "vae_tiling": "vae_tiling", "vae_tile_size": "vae_tile_size"}


def _saved_parameters(path: Path, given: set[str], values: dict) -> dict:
    """`values` (generate's options, in order) with those not given on the command line taken from the PNG."""
    from .images import read_parameters

    if not path.is_file():
        raise EdgesdError(f"--from '{path}' does not exist", "pass a PNG that edgesd or A1111 wrote")
    saved = read_parameters(path)
    return {name: saved[_SAVED[name]] if name not in given and _SAVED[name] in saved else value
            for name, value in values.items()}


def _options(provider_options: tuple[str, ...], component_providers: tuple[str, ...] = (), **values) -> RuntimeOptions:
    return RuntimeOptions(provider_options=_pairs("--provider-option", provider_options, "device_type=CPU"),
                          component_providers=_pairs("--component-provider", component_providers, "text_encoder=cpu"),
                          **values)


def _pairs(flag: str, items: tuple[str, ...], example: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EdgesdError(f"{flag} '{item}' is not KEY=VALUE", f"e.g. {flag} {example}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


@main.command()
@click.argument("prompts", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--workers", default=1, show_default=True, type=int,
              help="Worker processes (each loads the model once; they share the cores); with --ray, Ray actors.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run on a Ray cluster (host:port of its head, or 'auto' for the one this machine belongs to).")
@click.option("--seed", "base_seed", default=0, show_default=True, type=int,
              help="A row without a seed gets this + its line number - 1.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=int,
              help="Refuse a row whose width x height exceed this.")
@_runtime_options
def batch(prompts: Path, out: Path, workers: int, ray_address: str | None, base_seed: int, max_pixels: int,
          model_dir: Path | None, loras: tuple[str, ...], vae_decoder: Path | None, **runtime_options):
    """Make one picture per row of PROMPTS (JSON lines: prompt, negative, seed, size or width/height, steps,
    sampler, guidance, ...) into OUT/<line>.png; rows already in OUT are skipped, so a stopped run resumes."""
    from .batch import BatchJob, run_batch

    job = BatchJob(model_dir, _options(**runtime_options), tuple(LoraSpec.parse(text) for text in loras),
                   vae_decoder, max_pixels)
    with click.progressbar(length=0, label="pictures", file=sys.stderr, show_pos=True) as bar:
        def on_row(done: int, total: int) -> None:
            bar.length = total
            bar.update(1 if done else 0)

        report = run_batch(prompts, out, job, workers, ray_address, base_seed, on_row)
    for failure in report.failed:
        click.echo(f"failed: {failure}", err=True)
    click.echo(f"wrote {report.written} pictures to {out}"
               + (f", skipped {report.skipped} already there" if report.skipped else "")
               + (f", {len(report.failed)} failed (run again to retry them)" if report.failed else ""))
    if report.failed:
        sys.exit(2)


@main.command()
@click.option("--model", "models", multiple=True, type=click.Path(path_type=Path),
              help="A model folder to serve (repeatable; named by its folder name). Default: the default model.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback only unless you name another).")
@click.option("--port", default=7860, show_default=True, type=int, help="Port to listen on.")
@click.option("--token", default=None, help="Require 'Authorization: Bearer TOKEN' on every request.")
def serve(models: tuple[Path, ...], host: str, port: int, token: str | None):
    """Serve the OpenAI Images API (/v1/images/...) and A1111's /sdapi/v1/* over HTTP."""
    from .serve import serve as run

    if not 0 < port < 65536:
        raise EdgesdError(f"--port must be 1-65535, got {port}")
    click.echo(f"serving {', '.join(str(m) for m in models) or 'the default model'} on http://{host}:{port}", err=True)
    run(list(models), host, port, token)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipes", "recipes", multiple=True, type=click.Path(path_type=Path),
              help="Another export of the model (another recipe or format) to measure beside it; repeatable.")
@click.option("--providers", default=None, help="onnxruntime providers to measure, comma-separated (default: each usable one).")
@click.option("--backends", default=None, help="Backends to measure, comma-separated (default: onnxruntime,openvino).")
@click.option("--steps", default=20, show_default=True, type=int, help="Denoising steps of the measured picture.")
@click.option("--size", default=None, help="WIDTHxHEIGHT (default: the model's).")
@click.option("--guidance", default=None, type=float, help="Guidance scale (default: the model's).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results as JSON here.")
@click.option("--chart", "chart_path", type=click.Path(path_type=Path), default=None, help="Write a PNG bar chart here.")
def bench(model: Path, recipes: tuple[Path, ...], providers: str | None, backends: str | None, steps: int,
          size: str | None, guidance: float | None, json_path: Path | None, chart_path: Path | None):
    """Measure MODEL (and --recipes folders) on each backend and provider here: load, text encoder, U-Net
    s/step, VAE, total and peak memory, each configuration in a fresh process."""
    import platform

    from .benchmark import BenchSettings, chart, measure_in_child, table, targets

    from .request import parse_size

    width, height = parse_size(size, "--size") if size is not None else (None, None)
    if not 1 <= steps <= 1000:
        raise EdgesdError(f"--steps must be from 1 to 1000, got {steps}")
    for path in (json_path, chart_path):
        if path is not None and not path.parent.is_dir():
            raise EdgesdError(f"the folder '{path.parent}' for '{path.name}' does not exist", "create it first")
    configs = targets([model, *recipes], _names(providers), _names(backends))
    settings = BenchSettings(steps, width, height, guidance)
    # a bad setting (size, steps) is said once, before any configuration runs
    from .model import ModelFolder
    from .request import GenerationRequest

    folder = ModelFolder.open(model)
    GenerationRequest.build(folder, folder.family, "x", num_inference_steps=steps, width=width, height=height,
                            guidance_scale=guidance)
    rows = []
    with click.progressbar(configs, label="bench", file=sys.stderr, item_show_func=lambda c: c.label if c else "") as bar:
        for config in bar:
            rows.append({"label": config.label, "model": str(config.model), "options": config.options,
                         **measure_in_child(config, settings)})
    for line in table(rows):
        click.echo(line)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    if json_path is not None:
        json_path.write_text(json.dumps({"machine": machine, "settings": settings.__dict__, "rows": rows}, indent=2))
        click.echo(f"wrote {json_path}")
    if chart_path is not None:
        chart(rows, chart_path, f"{model.name}: total seconds, {steps} steps")
        click.echo(f"wrote {chart_path}")
    if all("error" in row for row in rows):
        sys.exit(2)


def _names(text: str | None) -> list[str] | None:
    """'cpu, webgpu' -> ['cpu', 'webgpu']; None stays None (every usable one)."""
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devices(as_json: bool):
    """The backends, execution providers and devices this machine can use, and what would add others."""
    from .devices import describe_devices, devices_text

    summary = describe_devices()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for line in devices_text(summary):
        click.echo(line)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--run", "load", is_flag=True,
              help="Load the graphs with the runtime options given and say where their nodes run.")
@_runtime_options_only
def info(model: Path, as_json: bool, load: bool, **runtime_options):
    """Describe the model folder MODEL: components, precisions, sizes, graph inputs/outputs."""
    from .describe import describe

    summary = describe(model)
    if load:
        from .pipeline import Pipeline

        summary["placement"] = Pipeline.load(model, _options(**runtime_options)).placement()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"model      {summary['path']}")
    click.echo(f"family     {summary['family']}: {summary['family_title']}")
    click.echo(f"written by {summary['written_by']}")
    click.echo(f"formats    {', '.join(summary['formats'])}")
    for key, value in summary["constants"].items():
        click.echo(f"  {key:<22}{value}")
    click.echo(f"scheduler  {summary['scheduler']}")
    d = summary["defaults"]
    click.echo(f"defaults   {d['num_inference_steps']} steps, guidance {d['guidance_scale']}")
    for name, g in summary["graphs"].items():
        click.echo(f"{name}: {g['precision']}, {g['size_mb']:.1f} MB")
        for io in ("inputs", "outputs"):
            for t in g[io]:
                click.echo(f"  {io[:-1]:<7}{t['name']:<24}{t['dtype']:<9}{t['shape']}")
        if name in summary.get("placement", {}):
            nodes = summary["placement"][name]
            click.echo("  runs on: " + ", ".join(f"{where} ({count} nodes)" for where, count in nodes.items()))


if __name__ == "__main__":
    main()
