"""What `edgesd info` prints: a model folder's components, precisions, sizes and graph signatures."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .errors import EdgesdError
from .graphs import GRAPHS
from .model import ModelFolder

_PRECISION = {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "uint8", 22: "int4", 21: "uint4"}


def _graph_summary(path: Path) -> dict:
    """Inputs/outputs from the ONNX file itself, and the precision of its largest weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EdgesdError(f"{path} is not a readable ONNX graph ({str(e)[:120]})", "re-export the model") from None

    def signature(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                        "shape": shape})
        return out

    by_type: dict[int, int] = {}
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        by_type[init.data_type] = by_type.get(init.data_type, 0) + n
    main_type = max(by_type, key=by_type.get) if by_type else 1
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
    return {"inputs": signature(model.graph.input), "outputs": signature(model.graph.output),
            "precision": _PRECISION.get(main_type, str(main_type)), "size_mb": size / 1e6}


def describe(path: Path) -> dict:
    folder = ModelFolder.open(path)
    graphs = {name: _graph_summary(folder.graph_path(name)) for name in GRAPHS if folder.has(name)}
    return {
        "path": str(folder.root),
        "written_by": "edgesd" if folder.manifest else "another exporter (optimum layout)",
        "constants": asdict(folder.constants),
        "scheduler": folder.scheduler_config.get("_class_name"),
        "defaults": asdict(folder.defaults),
        "graphs": graphs,
    }
