"""What `edgesd info` prints: a model folder's components, precisions, sizes and graph signatures."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from .errors import EdgesdError
from .model import ModelFolder

_PRECISION = {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "uint8", 22: "int4", 21: "uint4"}


def _graph_summary(path: Path) -> dict:
    """Inputs/outputs from the ONNX file itself, and the precision of its largest weights (read without the
    onnx package, which the runtime-only install does not have)."""
    from .tensor_files import onnx_signature

    sig = onnx_signature(path)
    main_type = max(sig.weight_elements, key=sig.weight_elements.get) if sig.weight_elements else 1
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
    return {"inputs": sig.inputs, "outputs": sig.outputs,
            "precision": _PRECISION.get(main_type, str(main_type)), "size_mb": size / 1e6}


def _ir_summary(path: Path) -> dict:
    """The same for an OpenVINO IR graph, read (not compiled) with openvino."""
    try:
        import openvino as ov
    except ImportError:
        raise EdgesdError(f"{path} is OpenVINO IR; reading it needs the openvino package",
                          "pip install -c constraints.txt 'edgesd[openvino]'") from None
    try:
        model = ov.Core().read_model(str(path))
    except Exception as e:
        raise EdgesdError(f"{path} is not a readable OpenVINO graph ({str(e).splitlines()[-1][:120]})",
                          "re-export the model") from None

    def signature(ports):
        return [{"name": sorted(p.get_names())[0] if p.get_names() else "",
                 "dtype": p.get_element_type().to_dtype().name,
                 "shape": [str(d) if d.is_dynamic else d.get_length() for d in p.get_partial_shape()]} for p in ports]

    by_type: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            t = op.get_output_element_type(0).get_type_name()
            by_type[t] = by_type.get(t, 0) + math.prod(op.get_output_shape(0))
    main_type = max(by_type, key=by_type.get) if by_type else "f32"
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.stem == path.stem)
    return {"inputs": signature(model.inputs), "outputs": signature(model.outputs),
            "precision": _IR_PRECISION.get(main_type, main_type), "size_mb": size / 1e6}


_IR_PRECISION = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "i8": "int8", "u8": "uint8", "i4": "int4", "u4": "uint4"}


def describe(path: Path) -> dict:
    folder = ModelFolder.open(path)
    graphs = {name: (_ir_summary if folder.graph_format(name) == "openvino" else _graph_summary)(folder.graph_path(name))
              for name in folder.specs if folder.has(name)}
    return {
        "path": str(folder.root),
        "written_by": "edgesd" if folder.manifest else "another exporter (optimum layout)",
        "family": folder.family.name,
        "family_title": folder.family.title,
        "formats": sorted({folder.graph_format(name) for name in folder.specs if folder.has(name)}),
        "constants": asdict(folder.constants),
        "scheduler": folder.scheduler_config.get("_class_name"),
        "defaults": asdict(folder.defaults),
        "graphs": graphs,
    }
