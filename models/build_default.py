"""Build the embedded default model from a trained diffusers folder (see TRAINING.md).

    python -m edgesd.models.build_default TRAINED_DIFFUSERS_DIR

Exports it with the `fp16` recipe (weights stored in half precision, computed in fp32:
half the size, the same pictures) into models/edgesd-tiny/, records the model's own
default steps and guidance, and copies the model card in beside the graphs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from edgesd.model import GenerationDefaults
from edgesd.models_path import DEFAULT_MODEL_NAME

HERE = Path(__file__).resolve().parent
TARGET = HERE / DEFAULT_MODEL_NAME
RECIPE = "fp16"
# Guidance above ~3 pushes this small model's flat colours off its latent manifold (see the card).
DEFAULTS = GenerationDefaults(num_inference_steps=20, guidance_scale=1.5)


def build(src: Path, target: Path = TARGET) -> Path:
    from edgesd.export import ExportOptions, export_model

    export_model(src, target, ExportOptions(overwrite=True, recipe=RECIPE, defaults=DEFAULTS))
    shutil.copy(HERE / "MODEL_CARD.md", target / "README.md")
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(f"wrote {build(Path(sys.argv[1]))}")
