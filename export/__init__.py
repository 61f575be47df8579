"""edgesd's exporter: a local diffusers SD folder -> ONNX graphs in optimum's layout + edgesd.json.

Needs the `export` extra (torch, diffusers, transformers, onnx). Output is written
to a temporary folder beside OUT and moved into place only when every graph
passed its parity check, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgesd.errors import EdgesdError
from edgesd.model import GRAPH_FILE, GenerationDefaults, constants_from_configs, write_manifest
from edgesd.tokenizer import ClipTokenizer

from .parity import ParityResult
from .recipes import MIN_PSNR_DB, RECIPES, Recipe

# Spatial size of the random inputs used for parity checks (latent pixels); small keeps it quick.
PARITY_LATENT_SIZE = 16

STAGES = ("load", "text_encoder", "unet", "vae_decoder", "vae_encoder", "finish")


@dataclass(frozen=True)
class ExportOptions:
    overwrite: bool = False
    with_vae_encoder: bool = True
    recipe: Recipe = "fp32"
    parity_threshold_db: float | None = None  # None: the recipe's MIN_PSNR_DB
    defaults: GenerationDefaults | None = None  # the model's own default steps / guidance, if it has them

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise EdgesdError(f"unknown recipe '{self.recipe}'", f"choose one of: {', '.join(RECIPES)}")

    @property
    def threshold_db(self) -> float:
        return MIN_PSNR_DB[self.recipe] if self.parity_threshold_db is None else self.parity_threshold_db


@dataclass
class ExportReport:
    out: Path
    parity: list[ParityResult]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.parity)


def export_model(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 on_stage: Callable[[str], None] | None = None) -> ExportReport:
    """Export every graph of the SD folder `src` into `out`. Raises EdgesdError on bad input or failed parity."""
    try:
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise EdgesdError(f"the exporter needs the 'export' extra ({e.name} is not installed)",
                          "pip install -c constraints.txt 'edgesd[export]'") from None

    from .components import export_text_encoder, export_unet, export_vae_decoder, export_vae_encoder
    from .loading import check_source_folder, load_source, source_checksum

    src, out = Path(src), Path(out)
    check_source_folder(src)
    if out.exists() and not out.is_dir():
        raise EdgesdError(f"output '{out}' exists and is not a folder", "choose a folder path for OUT")
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise EdgesdError(f"output folder '{out}' exists and is not empty", "pass --overwrite or choose another")
    if not out.parent.exists():
        raise EdgesdError(f"the folder '{out.parent}' for the output does not exist", "create it first")
    if out.resolve() == src.resolve():
        raise EdgesdError("the output folder is the source folder", "choose another output folder")

    started = time.perf_counter()
    stage = on_stage or (lambda name: None)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stage("load")
        torch.manual_seed(0)
        model = load_source(src)
        cfg = model.configs
        constants = constants_from_configs(cfg["unet"], cfg["vae"], cfg["text_encoder"], cfg["scheduler"])
        tokenizer = ClipTokenizer.from_folder(src / "tokenizer")
        latent = max(PARITY_LATENT_SIZE, constants.latent_size_multiple)
        threshold, recipe = options.threshold_db, options.recipe

        parity: list[ParityResult] = []
        stage("text_encoder")
        parity += export_text_encoder(model.text_encoder, tmp / "text_encoder", tokenizer.max_length, recipe,
                                      threshold)
        stage("unet")
        parity += export_unet(model.unet, tmp / "unet", latent, tokenizer.max_length, recipe, threshold)
        del model.unet
        stage("vae_decoder")
        parity += export_vae_decoder(model.vae, tmp / "vae_decoder", latent, recipe, threshold)
        if options.with_vae_encoder:
            stage("vae_encoder")
            parity += export_vae_encoder(model.vae, tmp / "vae_encoder", latent * constants.vae_scale_factor,
                                         recipe, threshold)
        stage("finish")
        report = ExportReport(out, parity, time.perf_counter() - started)
        if not report.passed:
            failed = ", ".join(f"{r.component}.{r.output} {r.psnr_db:.1f} dB" for r in parity if not r.passed)
            raise ExportParityError(report, f"parity check failed: {failed} (need >= {threshold} dB)")
        _write_side_files(src, tmp, tokenizer, cfg)
        graphs = {
            r.component: {"file": f"{r.component}/{GRAPH_FILE}", "precision": recipe} for r in parity
        }
        source = {"path": str(src.resolve()), "sha256": source_checksum(src)}
        write_manifest(tmp, constants, graphs, source, options.defaults)
        (tmp / "parity.json").write_text(json.dumps({r.component + "." + r.output: r.to_json() for r in parity},
                                                    indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ExportParityError(EdgesdError):
    def __init__(self, report: ExportReport, message: str):
        super().__init__(message, "the export was not written; report this model to the edgesd developers")
        self.report = report


def _write_side_files(src: Path, out: Path, tokenizer: ClipTokenizer, cfg: dict) -> None:
    """Tokenizer, scheduler, component configs and model_index.json, as optimum's layout has them."""
    tokenizer.write_folder(out / "tokenizer")
    (out / "scheduler").mkdir()
    shutil.copy(src / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    for component, config in (("text_encoder", "text_encoder"), ("unet", "unet"),
                              ("vae_decoder", "vae"), ("vae_encoder", "vae")):
        if (out / component).is_dir():
            (out / component / "config.json").write_text(json.dumps(cfg[config], indent=2) + "\n")
    index = {k: v for k, v in cfg["model_index"].items() if not isinstance(v, list)}
    index.update({
        "_class_name": "ORTStableDiffusionPipeline",
        "text_encoder": ["onnx", "ONNXModel"],
        "unet": ["onnx", "ONNXModel"],
        "vae_decoder": ["onnx", "ONNXModel"],
        "vae_encoder": ["onnx", "ONNXModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": cfg["model_index"].get("scheduler", ["diffusers", cfg["scheduler"].get("_class_name")]),
    })
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
