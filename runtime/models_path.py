"""Where the embedded default model lives."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import EdgesdError

DEFAULT_MODEL_NAME = "edgesd-tiny"
# A file in the model folder saying its weights are random (the stand-in before the trained model).
PLACEHOLDER_MARKER = "RANDOM_WEIGHTS"


def default_model_path() -> Path:
    path = Path(str(resources.files("edgesd.models"))) / DEFAULT_MODEL_NAME
    if not (path / "unet" / "model.onnx").is_file():
        raise EdgesdError(
            "no embedded default model is installed",
            "pass --model DIR (a folder from `edgesd export`), or build the stand-in with "
            "`python -m edgesd.models.placeholder`",
        )
    return path


def is_placeholder(path: Path) -> bool:
    return (Path(path) / PLACEHOLDER_MARKER).is_file()
