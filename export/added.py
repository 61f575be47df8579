"""What the commands that add graphs to an exported model (`edgesd deepcache`, `edgesd tome`) share."""

from __future__ import annotations

from pathlib import Path

from edgesd.errors import EdgesdError
from edgesd.model import ModelFolder


def folder_to_add_to(root: str | Path, what: str, command: str) -> ModelFolder:
    """The exported model at `root`, if `what` (e.g. "DeepCache's graphs") can be added to it by `command`:
    not the embedded default model (part of the installation), and with an ONNX U-Net (the graphs are made
    from it)."""
    from edgesd.models_path import default_model_path

    folder = ModelFolder.open(root)
    try:
        embedded = default_model_path().resolve()
    except EdgesdError:  # an installation without it
        embedded = None
    if folder.root.resolve() == embedded:
        raise EdgesdError("the embedded default model is part of the installation and is not changed",
                          f"copy it and add {what} to the copy: cp -r {folder.root} my-model && "
                          f"{command} my-model")
    if folder.graph_format("unet") != "onnx":
        raise EdgesdError(f"'{folder.root}' has an OpenVINO IR U-Net; {command} works on an ONNX one",
                          f"export the model with --format onnx (the default) and add {what} to that")
    return folder


def cpu_session(path: Path):
    """An ONNX Runtime CPU session of the graph at `path`, quiet (the parity checks of the added graphs)."""
    import onnxruntime as ort

    made = ort.SessionOptions()
    made.log_severity_level = 3
    return ort.InferenceSession(str(path), made, providers=["CPUExecutionProvider"])
