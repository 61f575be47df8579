"""Where the embedded default model lives."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import EdgesdError

DEFAULT_MODEL_NAME = "edgesd-tiny"


def default_model_path() -> Path:
    path = Path(str(resources.files("edgesd.models"))) / DEFAULT_MODEL_NAME
    if not (path / "unet" / "model.onnx").is_file():
        raise EdgesdError(
            "no embedded default model is installed",
            "reinstall edgesd (the wheel carries models/edgesd-tiny), or pass --model DIR",
        )
    return path

