"""A VAE exported on its own: a diffusers AutoencoderTiny (TAESD, TAESDXL) or AutoencoderKL folder -> a decoder
folder that `Pipeline.load(model, vae_decoder=OUT)` / `edgesd generate --vae-decoder OUT` decode with.

Writes `OUT/vae_decoder/model.onnx` (or IR) + its config.json and an edgesd.json saying what it is. The graph is
the same VAE_DECODER description as a model's own, traced and checked against PyTorch like every other.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from edgesd.errors import EdgesdError
from edgesd.graphs import VAE_DECODER
from edgesd.model import GRAPH_FILES, MANIFEST, MANIFEST_VERSION, read_json

VAE_CLASSES = ("AutoencoderTiny", "AutoencoderKL")
VAE_RECIPES = ("fp32", "fp16")  # a decoder is small; the lossy recipes would gain little


def vae_folder(src: Path) -> Path | None:
    """The diffusers VAE folder `src` is (or holds as vae/), or None when it is not one."""
    for folder in (src, src / "vae"):
        config = folder / "config.json"
        if config.is_file() and not (src / "model_index.json").is_file():
            if read_json(config, "VAE").get("_class_name") in VAE_CLASSES:
                return folder
    return None


def export_vae(src: Path, out: Path, options) -> list:
    """Export the VAE folder `src`'s decoder to `out`; returns the parity results."""
    from . import move_into_place
    from .components import export_graph
    from .loading import build_module, source_checksum
    from .parity import FP32_MIN_PSNR_DB
    from .recipes import write_recipe
    from .loading import FolderWeights
    from .single_file import _ParentFolderWeights

    folder = vae_folder(src)
    config = read_json(folder / "config.json", "VAE")
    if options.recipe not in VAE_RECIPES or options.component_overrides:
        raise EdgesdError(f"a VAE on its own is exported in {' or '.join(VAE_RECIPES)}, not {options.recipe}",
                          "pass --recipe fp32 or --recipe fp16")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        weights = _ParentFolderWeights(FolderWeights(folder.parent), folder.name)
        sizes = {"batch": 1, "channels": int(config.get("latent_channels", 4)), "latent_height": 16,
                 "latent_width": 16}
        parity = export_graph(lambda: build_module("vae", config, weights), VAE_DECODER, sizes,
                              tmp / "fp32" / "vae_decoder", FP32_MIN_PSNR_DB, options.attention_mode())
        failed = [r for r in parity if not r.passed]
        if failed:
            raise EdgesdError(f"parity check failed: vae_decoder {failed[0].psnr_db:.1f} dB",
                              "the export was not written; report this VAE to the edgesd developers")
        final = tmp / "final"
        (final / "vae_decoder").mkdir(parents=True)
        fp32_graph = tmp / "fp32" / "vae_decoder" / "model.onnx"
        if options.format == "openvino":
            from .openvino_ir import write_ir_recipe

            write_ir_recipe(fp32_graph, final / "vae_decoder", options.recipe)
        elif options.recipe == "fp32":
            shutil.copytree(fp32_graph.parent, final / "vae_decoder", dirs_exist_ok=True)
        else:
            write_recipe(fp32_graph, final / "vae_decoder" / "model.onnx", options.recipe)
        (final / "vae_decoder" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        manifest = {"format_version": MANIFEST_VERSION, "kind": "vae_decoder", "vae_class": config["_class_name"],
                    "source": {"path": str(src.resolve()), "sha256": source_checksum(folder)},
                    "graphs": {"vae_decoder": {**VAE_DECODER.to_json(), "format": options.format,
                                               "precision": options.recipe,
                                               "file": f"vae_decoder/{GRAPH_FILES[options.format]}"}}}
        (final / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        move_into_place(final, out)
        return parity
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
