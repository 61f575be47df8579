"""edgesd's exporter: a local diffusers SD folder -> ONNX graphs (or OpenVINO IR) in optimum's layout + edgesd.json.

Needs the `export` extra (torch, diffusers, transformers, onnx; openvino and nncf for IR). Output is written
to a temporary folder beside OUT and moved into place only when every graph
passed its parity check, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgesd.errors import EdgesdError
from edgesd.lora import LoraSpec
from edgesd.model import (GRAPH_FILE, GRAPH_FILES, MANIFEST, GenerationDefaults, constants_from_configs,
                          write_manifest)
from edgesd.tokenizer import ClipTokenizer

from .parity import FP32_MIN_PSNR_DB, ParityResult
from .single_file import PredictionType
from .recipes import (ATTENTION_MODES, CALIBRATED, MIN_IMAGE_PSNR_DB, MIN_IMAGE_PSNR_DB_CONVERTED_FP32, Attention,
                      Format, Recipe, component_recipes, graph_file_format)

if TYPE_CHECKING:
    from .fidelity import FidelityReport

# Spatial size of the random inputs used for parity checks (latent pixels); small keeps it quick.
PARITY_LATENT_SIZE = 16

# Built-in calibration prompts run by default, per format. NNCF's IR int8 U-Net needs all eight: on the
# embedded model its worst fidelity picture is 27.5 dB from fp32 with four, 30.7 with eight
# (bench/results/recipes-fidelity-edgesd-tiny-openvino-2026-12-05.md); onnxruntime's static int8 keeps 35 dB
# with four, and its MinMax calibration holds every recorded activation in memory.
CALIBRATION_SIZE: dict[str, int] = {"onnx": 4, "openvino": 8}

STAGES = ("load", "text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "recipes", "fidelity")



@dataclass(frozen=True)
class ExportOptions:
    overwrite: bool = False
    with_vae_encoder: bool = True
    recipe: Recipe = "fp32"
    format: Format = "onnx"  # onnx, or openvino (IR written by openvino.convert_model and NNCF)
    # per component ("text_encoder", "unet", "vae_decoder", "vae_encoder"): a recipe other than `recipe`'s
    component_overrides: dict[str, Recipe] = field(default_factory=dict)
    parity_threshold_db: float = FP32_MIN_PSNR_DB  # each fp32 graph against PyTorch
    allow_lossy: bool = False  # write the export even if its fidelity is below the recipe's threshold
    # prompts whose U-Net inputs calibrate the int8 recipe (None: the first calibration_size built-in ones)
    calibration_prompts: tuple[str, ...] | None = None
    calibration_size: int | None = None  # None: CALIBRATION_SIZE of the format
    defaults: GenerationDefaults | None = None  # the model's own default steps / guidance, if it has them
    # A single-file source: the diffusers folder whose configs describe it (None: the family's shipped configs),
    # and the prediction type where the file cannot say (SD 2.x 768-v: v_prediction).
    config: Path | None = None
    prediction_type: PredictionType | None = None
    vae: Path | None = None  # another VAE than the source's own: a .safetensors file or a diffusers vae/ folder
    loras: tuple[LoraSpec, ...] = ()  # merged into the weights before tracing (every recipe then takes them)
    # fused: attention as one MultiHeadAttention node (fusion.py); unfused: torch's nodes, for a runtime or
    # provider without that op (or to measure what the fusion gains). None: fused for ONNX; unfused for
    # OpenVINO IR: OpenVINO fuses torch's nodes into its own SDPA for each device (on the CPU the fused graph
    # ran no faster: bench/results/recipes-backends-vm-2026-12-02*)
    attention: Attention | None = None

    def __post_init__(self):
        component_recipes(self.recipe, self.component_overrides, self.format)  # raises on unknown names
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise EdgesdError(f"unknown attention '{self.attention}'", f"use one of: {', '.join(ATTENTION_MODES)}")
        if self.calibration_prompts is not None and not [p for p in self.calibration_prompts if p.strip()]:
            raise EdgesdError("the calibration prompts are empty", "give at least one prompt, one per line")
        if self.calibration_size is not None and self.calibration_size < 1:
            raise EdgesdError(f"calibration size must be >= 1, got {self.calibration_size}")

    def recipes(self, components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
                ) -> dict[str, Recipe]:
        """The recipe of each of a family's `components` this export writes."""
        chosen = component_recipes(self.recipe, self.component_overrides, self.format, components)
        return {c: r for c, r in chosen.items() if self.with_vae_encoder or c != "vae_encoder"}

    def attention_mode(self) -> Attention:
        return self.attention or ("unfused" if self.format == "openvino" else "fused")

    def calibration(self) -> list[str]:
        from .fidelity import CALIBRATION_PROMPTS

        if self.calibration_prompts is not None:
            return [p for p in self.calibration_prompts if p.strip()]
        return list(CALIBRATION_PROMPTS[: self.calibration_size or CALIBRATION_SIZE[self.format]])


@dataclass
class ExportReport:
    out: Path
    parity: list[ParityResult]
    seconds: float
    fidelity: "FidelityReport | None" = None
    notes: tuple[str, ...] = ()  # what was assumed about the source (e.g. an SD 2.x file's prediction type)

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

        if options.format == "openvino":
            import nncf  # noqa: F401
            import openvino  # noqa: F401
    except ImportError as e:
        raise EdgesdError(f"the exporter needs the 'export' extra ({e.name} is not installed)",
                          "pip install -c constraints.txt 'edgesd[export]'") from None

    from .components import export_graph
    from .loading import source_checksum
    from .vae import export_vae, vae_folder

    src, out = Path(src), Path(out)
    if src.is_dir() and (src / MANIFEST).is_file():  # an edgesd export: its graphs are the reference
        return reexport(src, out, options, on_stage)
    if src.is_dir() and vae_folder(src) is not None:  # TAESD or another VAE on its own: its decoder
        _check_output(src, out, options)
        started = time.perf_counter()
        return ExportReport(out, export_vae(src, out, options), time.perf_counter() - started)
    model = open_source(src, options)  # checks the source and finds its family; no weights read yet
    _check_output(src, out, options)

    started = time.perf_counter()
    stage = on_stage or (lambda name: None)
    family, cfg = model.family, model.configs
    components = (*family.text_components, "unet", "vae_decoder", "vae_encoder")
    recipes = options.recipes(components)
    # The fp32 ONNX export (in tmp) is the reference of the recipes; it is the output itself unless converted.
    converted = options.format != "onnx" or any(r != "fp32" for r in recipes.values())
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    final = out.parent / f".{out.name}.recipe-{os.getpid()}" if converted else tmp
    for folder in (tmp, final):
        shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    try:
        stage("load")
        torch.manual_seed(0)
        constants = constants_from_configs(cfg["unet"], cfg["vae"], cfg["text_encoder"], cfg["scheduler"])
        tokenizers = model.tokenizers
        specs = family.graph_specs(cfg)
        latent = max(PARITY_LATENT_SIZE, constants.latent_size_multiple)
        threshold = options.parity_threshold_db
        parity: list[ParityResult] = []
        for component in recipes:  # one network in memory at a time, freed before its parity check
            stage(component)
            sizes = family.sample_sizes(component, cfg, latent)
            parity += export_graph(lambda: model.load(component), specs[component], sizes, tmp / component,
                                   threshold, options.attention_mode())
        report = ExportReport(out, parity, time.perf_counter() - started, notes=model.notes)
        if not report.passed:
            failed = ", ".join(f"{r.component}.{r.output} {r.psnr_db:.1f} dB" for r in parity if not r.passed)
            raise ExportParityError(report, f"parity check failed: {failed} (need >= {threshold} dB)")
        _write_side_files(tmp, tokenizers, cfg, family)
        source = {"path": str(src.resolve()), "sha256": source_checksum(src)}
        if options.vae is not None:
            source["vae"] = {"path": str(Path(options.vae).resolve()), "sha256": source_checksum(Path(options.vae))}
        if options.loras:
            source["loras"] = [{"path": str(l.path.resolve()), "scale": l.scale, "sha256": source_checksum(l.path)}
                               for l in options.loras]
        write_manifest(tmp, constants, _graph_entries(dict.fromkeys(recipes, "fp32"), "onnx"), source,
                       specs, family.name, options.defaults)
        (tmp / "parity.json").write_text(json.dumps({r.component + "." + r.output: r.to_json() for r in parity},
                                                    indent=2) + "\n")
        return _recipes_and_fidelity(tmp, final, out, report, options, converted, stage, started)
    except OSError as e:  # a full disk or a folder that cannot be written (tokenizers, graphs, reports)
        raise EdgesdError(f"the export could not write {e.filename or 'its output'} ({e.strerror or e})",
                          "free disk space or choose another output folder; nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)


def reexport(src: Path, out: Path, options: ExportOptions = ExportOptions(),
             on_stage: Callable[[str], None] | None = None) -> ExportReport:
    """An edgesd ONNX export in fp32 or fp16 (fp16-stored weights, computed in fp32) written again in another
    recipe or format, without its PyTorch source: its graphs, the fp16 weights widened back to fp32, are the
    reference that the recipes are made from and measured against (the embedded model ships this way)."""
    import onnx

    from edgesd.model import ModelFolder

    from .components import save_graph
    from .loading import source_checksum
    from .quantize import fold_initializer_casts

    folder = ModelFolder.open(src)
    graphs = folder.manifest.get("graphs", {})
    other = [f"{c} is {g.get('precision')} {g.get('format', 'onnx')}" for c, g in graphs.items()
             if g.get("format", "onnx") != "onnx" or g.get("precision") not in ("fp32", "fp16")]
    if other:
        raise EdgesdError(f"'{src}' cannot be exported again: {', '.join(other)}",
                          "export from the model's diffusers folder, or from its fp32 or fp16 ONNX export")
    if options.loras or options.vae is not None or options.config is not None or options.prediction_type:
        raise EdgesdError("--lora, --vae, --config and --prediction-type change a PyTorch source, not an export",
                          "export from the model's diffusers folder or .safetensors file to use them")
    _check_output(src, out, options)
    stage = on_stage or (lambda name: None)
    started = time.perf_counter()
    stage("load")
    recipes = options.recipes(tuple(graphs))
    options = replace(options, defaults=options.defaults or folder.defaults)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    final = out.parent / f".{out.name}.recipe-{os.getpid()}"
    for partial in (tmp, final):
        shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("fidelity.json"))
        for component in graphs:
            if component not in recipes:
                shutil.rmtree(tmp / component)
                continue
            stage(component)
            path = tmp / component / GRAPH_FILE
            model = onnx.load(str(path))
            fold_initializer_casts(model.graph)  # fp16-stored weights -> the fp32 values they compute with
            for data in path.parent.glob(f"{GRAPH_FILE}*"):
                data.unlink()
            save_graph(model, path)
        source = {**folder.manifest.get("source", {}), "export": {"path": str(src.resolve()),
                                                                 "sha256": source_checksum(src)}}
        write_manifest(tmp, folder.constants, _graph_entries(dict.fromkeys(recipes, "fp32"), "onnx"), source,
                       folder.specs, folder.family.name, options.defaults)
        report = ExportReport(out, [], time.perf_counter() - started)
        return _recipes_and_fidelity(tmp, final, out, report, options, True, stage, started)
    except OSError as e:
        raise EdgesdError(f"the export could not write {e.filename or 'its output'} ({e.strerror or e})",
                          "free disk space or choose another output folder; nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)


def _recipes_and_fidelity(tmp: Path, final: Path, out: Path, report: ExportReport, options: ExportOptions,
                          converted: bool, stage: Callable[[str], None], started: float) -> ExportReport:
    """The fp32 ONNX export in `tmp` (with its edgesd.json and parity.json) -> each graph in its recipe and the
    options' format in `final` (or `tmp` itself when nothing is converted), the fidelity report against `tmp`,
    and the finished folder moved to `out` if it passes (or lossy exports are allowed)."""
    from edgesd.model import ModelFolder

    from .fidelity import measure as measure_fidelity

    folder = ModelFolder.open(tmp)
    recipes = options.recipes(tuple(folder.manifest["graphs"]))
    if converted:
        stage("recipes")
        _write_recipes(tmp, final, recipes, options)
        if options.format == "openvino":
            _write_model_index(final, {**folder.configs, "scheduler": folder.scheduler_config}, folder.family,
                               "openvino")
        write_manifest(final, folder.constants, _graph_entries(recipes, options.format), folder.manifest["source"],
                       folder.specs, folder.family.name, options.defaults)
    stage("fidelity")
    report.fidelity = measure_fidelity(tmp, final, recipes, _threshold(recipes, options.format))
    report.seconds = time.perf_counter() - started
    (final / "fidelity.json").write_text(json.dumps(report.fidelity.to_json(), indent=2) + "\n")
    if not report.fidelity.passed and not options.allow_lossy:
        raise ExportFidelityError(report)
    move_into_place(final, out)
    return report


def remove_stale_partials(out: Path) -> None:
    """Delete the partial folders of exports to `out` whose process is gone (killed before it could clean up)."""
    import re

    from edgesd.images import process_gone

    for folder in out.parent.glob(f".{out.name}.*-*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(partial|recipe)-(\d+)", folder.name)
        if m and folder.is_dir() and process_gone(int(m[2])):
            shutil.rmtree(folder, ignore_errors=True)


def move_into_place(final: Path, out: Path) -> None:
    """The finished export replaces OUT (only now: a failed export leaves OUT as it was)."""
    if out.exists():
        shutil.rmtree(out)
    final.rename(out)


def _threshold(recipes: dict[str, Recipe], fmt: Format) -> float:
    """The loosest threshold among the recipes used (the image reflects all of them)."""
    def one(recipe: Recipe) -> float:
        return MIN_IMAGE_PSNR_DB_CONVERTED_FP32 if recipe == "fp32" and fmt != "onnx" else MIN_IMAGE_PSNR_DB[recipe]
    return min(one(r) for r in recipes.values())


def _graph_entries(recipes: dict[str, Recipe], fmt: Format) -> dict[str, dict]:
    """The manifest's graph entries: each component's file, format and recipe."""
    formats = {c: graph_file_format(c, r, fmt) for c, r in recipes.items()}
    return {c: {"file": f"{c}/{GRAPH_FILES[formats[c]]}", "format": formats[c], "precision": r}
            for c, r in recipes.items()}


def _write_recipes(reference: Path, final: Path, recipes: dict[str, Recipe], options: ExportOptions) -> None:
    """`final`: the side files of the fp32 export at `reference` (no manifest), and each graph in its recipe
    and the options' format."""
    from .fidelity import calibration_feeds
    from .openvino_ir import write_ir_recipe
    from .recipes import write_recipe
    from .weight_map import recipe_weight_map

    shutil.copytree(reference, final, ignore=shutil.ignore_patterns(f"{GRAPH_FILE}*", "edgesd.json"))
    calibrated = any(r in CALIBRATED for r in recipes.values())
    calibration = calibration_feeds(reference, options.calibration()) if calibrated else None
    for component, recipe in recipes.items():
        feeds = calibration[component] if recipe in CALIBRATED else None
        if graph_file_format(component, recipe, options.format) == "openvino":
            write_ir_recipe(reference / component / GRAPH_FILE, final / component, recipe, feeds)
        else:
            write_recipe(reference / component / GRAPH_FILE, final / component / GRAPH_FILE, recipe, feeds,
                         component)
        recipe_weight_map(component, reference / component, final / component, recipe, options.format)


class ExportParityError(EdgesdError):
    def __init__(self, report: ExportReport, message: str):
        super().__init__(message, "the export was not written; report this model to the edgesd developers")
        self.report = report


class ExportFidelityError(EdgesdError):
    def __init__(self, report: ExportReport):
        f = report.fidelity
        super().__init__(f"a recipe image is {f.worst_image_psnr_db:.1f} dB PSNR from the fp32 export's, below "
                         f"the threshold of {f.threshold_db:.1f} dB; the export was not written",
                         "use a less lossy recipe (e.g. --vae-recipe fp16), or pass --allow-lossy to keep it anyway")
        self.report = report


def _check_output(src: Path, out: Path, options: ExportOptions) -> None:
    if out.exists() and not out.is_dir():
        raise EdgesdError(f"output '{out}' exists and is not a folder", "choose a folder path for OUT")
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise EdgesdError(f"output folder '{out}' exists and is not empty", "pass --overwrite or choose another")
    if not out.parent.exists():
        raise EdgesdError(f"the folder '{out.parent}' for the output does not exist", "create it first")
    if out.resolve() == src.resolve():
        raise EdgesdError("the output folder is the source folder", "choose another output folder")


def open_source(src: Path, options: ExportOptions):
    """The SourceModel of a diffusers folder or a single-file checkpoint, with the options' VAE."""
    from .loading import load_source
    from .single_file import load_single_file, vae_override

    if not src.exists():
        raise EdgesdError(f"source '{src}' does not exist", "pass a diffusers folder or a .safetensors checkpoint")
    if options.vae is not None and not Path(options.vae).exists():
        raise EdgesdError(f"--vae '{options.vae}' does not exist", "pass a VAE .safetensors file or a diffusers vae/ folder")
    if src.is_file():
        model = load_single_file(src, options.config, options.prediction_type)
    else:
        if options.config is not None or options.prediction_type is not None:
            raise EdgesdError("--config and --prediction-type are for single-file checkpoints",
                              "a diffusers folder has its own configs; edit its scheduler_config.json instead")
        model = load_source(src)
    if options.vae is not None:
        model.vae, model.configs["vae"] = vae_override(Path(options.vae), model.configs["vae"])
    if options.loras:
        model.transforms = (*model.transforms, merge_loras(model, options.loras))
    return model


def merge_loras(model, loras: tuple[LoraSpec, ...]):
    """A SourceModel transform adding the LoRAs' deltas to each network as it loads; the files are read and
    checked against every component now, before any export work."""
    import torch

    from edgesd.lora import LORA_COMPONENTS, lora_deltas

    from .single_file import _expected_shapes

    components = [c for c in LORA_COMPONENTS if c == "unet" or c in model.family.text_components]
    targets = {c: {k: s for k, s in _expected_shapes(c, model.configs[c], model.family.projected(c)).items()
                   if len(s) in (2, 4)} for c in components}
    deltas = lora_deltas(loras, targets, model.family.title, model.configs["unet"])

    def merge(folder: str, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, delta in deltas.get(folder, {}).items():
            params[name].data += torch.from_numpy(delta.dense())
    return merge


def _write_side_files(out: Path, tokenizers: dict[str, ClipTokenizer], cfg: dict, family) -> None:
    """Tokenizers, scheduler, component configs and model_index.json, as optimum's layout has them."""
    for folder, tokenizer in tokenizers.items():
        tokenizer.write_folder(out / folder)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"], indent=2) + "\n")
    configs = {c: c for c in family.text_components} | {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
    for component, config in configs.items():
        if (out / component).is_dir():
            (out / component / "config.json").write_text(json.dumps(cfg[config], indent=2) + "\n")
    _write_model_index(out, cfg, family, "onnx")


def _write_model_index(out: Path, cfg: dict, family, fmt: Format) -> None:
    """model_index.json naming the pipeline class of optimum's ONNX Runtime or OpenVINO (optimum-intel) layout."""
    index = {k: v for k, v in cfg["model_index"].items() if not isinstance(v, list)}
    graph = ["onnx", "ONNXModel"] if fmt == "onnx" else ["openvino", "OVModel"]
    index.update({
        "_class_name": ("ORT" if fmt == "onnx" else "OV") + family.pipelines[0],
        **dict.fromkeys((*family.text_components, "unet", "vae_decoder", "vae_encoder"), graph),
        **{e.tokenizer: ["transformers", "CLIPTokenizer"] for e in family.text_encoders},
        "scheduler": cfg["model_index"].get("scheduler", ["diffusers", cfg["scheduler"].get("_class_name")]),
    })
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
