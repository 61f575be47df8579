"""Build the stand-in default model: a tiny SD pipeline with RANDOM weights, exported by edgesd.

    python -m edgesd.models.placeholder

It exists so `edgesd generate` runs end to end on a fresh machine until the trained
embedded model ships; its pictures are noise. Needs the `export` extra.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from edgesd.models_path import DEFAULT_MODEL_NAME, PLACEHOLDER_MARKER

TARGET = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME


def build(target: Path = TARGET) -> Path:
    from edgesd.export import ExportOptions, export_model
    from edgesd.export.tiny import build_random_sd

    with tempfile.TemporaryDirectory() as tmp:
        src = build_random_sd(Path(tmp) / "src", seed=0)
        export_model(src, target, ExportOptions(overwrite=True))
    (target / PLACEHOLDER_MARKER).write_text(
        "This default model has RANDOM weights: a placeholder until the trained embedded model ships.\n"
    )
    return target


if __name__ == "__main__":
    if (TARGET / "unet" / "model.onnx").is_file() and "--force" not in sys.argv:
        print(f"{TARGET} already exists (pass --force to rebuild)")
    else:
        print(f"building a tiny RANDOM-weights placeholder model in {build()}")
