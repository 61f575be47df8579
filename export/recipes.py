"""Precision recipes: what the exporter does to an fp32 ONNX graph before its parity check.

- fp32: the traced graph as it is.
- fp16: weights stored in half precision, each followed by a Cast back to float32, so every
  op still computes in fp32 (no fp16 overflow, no black or NaN images) while the file is half
  the size. ONNX Runtime folds the casts when it loads the graph, so speed equals fp32. This is
  what OpenVINO's `compress_to_fp16` does for IR.

Every recipe also runs the lossless `dedupe_gather_tables` pass: an embedding table whose rows
repeat (the embedded model's text encoder ties all tokens it never saw to one row) is stored
once per distinct row, with an index map in front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np

from .parity import FP32_MIN_PSNR_DB

Recipe = Literal["fp32", "fp16"]
RECIPES: tuple[str, ...] = get_args(Recipe)

# Minimum output PSNR against PyTorch fp32, per recipe (Apple's ml-stable-diffusion uses 35 dB).
MIN_PSNR_DB: dict[str, float] = {"fp32": FP32_MIN_PSNR_DB, "fp16": 35.0}

# Weights smaller than this stay fp32 (biases, norms: little to gain, and they are the sensitive ones).
FP16_MIN_ELEMENTS = 256
# Dedupe a Gather table only when it shrinks to at most this fraction of its rows.
DEDUPE_MAX_FRACTION = 0.5


def apply_recipe(path: Path, recipe: Recipe) -> None:
    """Rewrite the graph at `path` in place for `recipe` (after tracing, before the parity check)."""
    import onnx

    from .components import save_graph

    # The graph alone first: an fp32 export of SD 1.5 should not read its 3.4 GB of U-Net weights back.
    model = onnx.load(str(path), load_external_data=False)
    if recipe == "fp16":
        onnx.load_external_data_for_model(model, str(path.parent))
    changed = dedupe_gather_tables(model.graph)  # embedding tables are small: they stay in model.onnx
    if recipe == "fp16":
        changed |= store_weights_fp16(model.graph)
    if changed:
        onnx.load_external_data_for_model(model, str(path.parent))  # all of it, before the file is rewritten
        save_graph(model, path)


def _initializers(graph) -> dict:
    return {init.name: init for init in graph.initializer}


def store_weights_fp16(graph) -> bool:
    """Store float32 initializers of >= FP16_MIN_ELEMENTS as float16, each behind a Cast to float32."""
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(init)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}.to_fp32",
                                      to=TensorProto.FLOAT))
    _prepend_nodes(graph, casts)
    return bool(casts)


def dedupe_gather_tables(graph) -> bool:
    """Replace Gather(table, ids) by Gather(unique_rows, Gather(row_of, ids)) where rows repeat."""
    import onnx
    from onnx import helper, numpy_helper

    inits = _initializers(graph)
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    added, changed = [], False
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        if inits[node.input[0]].data_location == onnx.TensorProto.EXTERNAL:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table_name = node.input[0]
        if axis != 0 or len(users[table_name]) != 1:
            continue
        table = numpy_helper.to_array(inits[table_name])
        if table.ndim != 2:
            continue
        rows, row_of = np.unique(table, axis=0, return_inverse=True)
        if len(rows) > DEDUPE_MAX_FRACTION * len(table):
            continue
        index_type = np.int32 if len(rows) < 2**31 else np.int64
        inits[table_name].CopyFrom(numpy_helper.from_array(rows, table_name))
        graph.initializer.append(numpy_helper.from_array(row_of.reshape(-1).astype(index_type), f"{table_name}.row_of"))
        remapped = f"{node.input[1]}.{table_name}.rows"
        added.append(helper.make_node("Gather", [f"{table_name}.row_of", node.input[1]], [remapped],
                                      name=f"{table_name}.remap", axis=0))
        node.input[1] = remapped
        changed = True
    _prepend_nodes(graph, added)
    return changed


def _prepend_nodes(graph, nodes: list) -> None:
    """Put `nodes` first (their inputs are graph inputs or initializers), keeping the graph sorted."""
    if not nodes:
        return
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
