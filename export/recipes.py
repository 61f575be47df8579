"""Precision recipes: what the exporter writes for each graph, from the fp32 graph it traced.

- fp32: the traced graph as it is.
- fp16: weights stored in half precision, each followed by a Cast back to float32, so every
  op still computes in fp32 (no fp16 overflow, no black or NaN images) while the file is half
  the size. ONNX Runtime folds the casts when it loads the graph, so speed equals fp32. This is
  what OpenVINO's `compress_to_fp16` does for IR.
- fp16-compute (ONNX): weights and arithmetic in half precision, as GPUs want it (ONNX Runtime's own
  float16 converter). The graph's inputs and outputs stay float32 (the runtime is unchanged); attention
  stays float32 where the U-Net's config asks (`upcast_attention`, SD 2.x, whose scores overflow fp16).
  The VAE gets fp16 (fp32 arithmetic): its decoder overflows fp16, which diffusers handles with
  `force_upcast`. On a CPU, ONNX Runtime casts each fp16 op it has no kernel
  for back to fp32: it runs, slower than fp32; the recipe is for GPU providers.
- int8-weights-fp16-compute (ONNX): fp16-compute with the Conv / MatMul / Gemm weights stored as int8 (one
  fp16 scale per output channel), each dequantized to fp16 where it is used: for GPUs with little memory
  (SD 1.5's U-Net weights take 0.86 GB instead of 1.72). The VAE as in fp16-compute.
- int8-weights, int4-weights, int8 (static W8A8, U-Net only): see `quantize.py` (ONNX) and `openvino_ir.py`.
- int8-hybrid (U-Net only, OpenVINO IR only): MatMul weights int8 weight-only, convolutions static W8A8.

A recipe names what each component gets (`component_recipes`): "int8" (the U-Net's activations too)
and "int4-weights" apply to the U-Net, the other graphs get int8 weights; any component can be overridden
(`--recipe int8 --vae-recipe fp16`). Every traced graph first gets the lossless passes (`lossless_passes`):
attention fused into one node (fusion.py), and an embedding table whose rows repeat (the embedded model's
text encoder ties all tokens it never saw to one row) stored once per distinct row, with an index map in
front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np

from edgesd.errors import EdgesdError

Recipe = Literal["fp32", "fp16", "fp16-compute", "int8-weights-fp16-compute", "int8-weights", "int8", "int4-weights",
                 "int8-hybrid"]
RECIPES: tuple[str, ...] = get_args(Recipe)
Format = Literal["onnx", "openvino"]
Attention = Literal["fused", "unfused"]  # the traced graphs' attention (fusion.py), see lossless_passes
ATTENTION_MODES: tuple[str, ...] = get_args(Attention)
FORMATS: tuple[str, ...] = get_args(Format)
# What each output format can write (int8-hybrid is NNCF's; onnxruntime.quantization has no such mode).
# OpenVINO picks its arithmetic precision per device at load (its inference_precision hint: f16 on GPUs),
# so the fp16-compute recipes are ONNX recipes.
_FP16_COMPUTE = ("fp16-compute", "int8-weights-fp16-compute")
FORMAT_RECIPES: dict[str, tuple[str, ...]] = {"onnx": tuple(r for r in RECIPES if r != "int8-hybrid"),
                                               "openvino": tuple(r for r in RECIPES if r not in _FP16_COMPUTE)}
# Recipes with activation quantization, calibrated on each graph's inputs over fp32 pipeline runs. The U-Net
# takes them all; the VAE decoder takes static int8 as an override (`--vae-recipe int8`, written as ONNX QDQ in
# either format, see graph_file_format): its convolutions at full picture size are most of the decode (SD 1.5
# at 512x512, random weights, 2-core AMD EPYC: 6.9 -> 2.8 s, bench/results/vm-2026-12-02.md).
# The VAE encoder, which text-to-image runs never call (so no calibration inputs), gets int8 weights instead.
CALIBRATED = ("int8", "int8-hybrid")
CALIBRATED_GRAPHS: dict[str, tuple[str, ...]] = {"unet": CALIBRATED, "vae_decoder": ("int8",)}
UNCALIBRATED_STAND_IN: dict[str, Recipe] = {"vae_encoder": "int8-weights"}
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")

# Minimum image PSNR (dB) of the recipe's pipeline against the fp32 export's, for its worst fidelity prompt
# (fidelity.py); below it the export fails unless --allow-lossy. Set below what the embedded model measures
# (worst prompt, bench/results/recipes-fidelity-edgesd-tiny-*.md: fp16 66, int8-weights 48, int8 35 dB; its
# int4-weights falls to 7 dB on a prompt it cannot draw and fails) with a margin for other models.
MIN_IMAGE_PSNR_DB: dict[str, float] = {"fp32": float("inf"), "fp16": 40.0, "fp16-compute": 30.0,
                                       "int8-weights-fp16-compute": 30.0,
                                       "int8-weights": 30.0, "int8": 25.0,
                                       "int4-weights": 25.0, "int8-hybrid": 25.0}
# fp32 in another format (OpenVINO IR) is the same network run by another runtime: not bit for bit the ONNX
# export's pictures (one LCM tiny model: 83 dB), so it gets fp16's threshold instead of fp32's "identical".
MIN_IMAGE_PSNR_DB_CONVERTED_FP32 = 40.0

# What a recipe gives the graphs it is not made for, by kind of graph. The activation-quantized recipes and
# int4-weights are U-Net recipes: the other graphs (small, and the text encoder sensitive to 4 bits: one
# embedded-model prompt fell to 7 dB) get int8 weights. The fp16-compute recipes leave the VAE fp16-stored with
# fp32 arithmetic (diffusers' force_upcast; `--vae-recipe fp16-compute` for fp16 arithmetic there too).
_INT8_ELSEWHERE: dict[str, Recipe] = {"text_encoder": "int8-weights", "vae": "int8-weights"}
OTHER_GRAPHS: dict[str, dict[str, Recipe]] = {"int8": _INT8_ELSEWHERE, "int8-hybrid": _INT8_ELSEWHERE,
                                              "int4-weights": _INT8_ELSEWHERE,
                                              **{r: {"vae": "fp16"} for r in _FP16_COMPUTE}}


def _kind(component: str) -> str:
    """text_encoder, text_encoder_2 -> text_encoder; vae_decoder, vae_encoder -> vae; unet -> unet."""
    return next((kind for kind in ("text_encoder", "vae") if component.startswith(kind)), component)


# Weights smaller than this stay fp32 (biases, norms: little to gain, and they are the sensitive ones).
FP16_MIN_ELEMENTS = 256
# Dedupe a Gather table only when it shrinks to at most this fraction of its rows.
DEDUPE_MAX_FRACTION = 0.5


def component_recipes(recipe: Recipe, overrides: dict[str, Recipe] | None = None,
                      fmt: Format = "onnx", components: tuple[str, ...] = COMPONENTS) -> dict[str, Recipe]:
    """The recipe of each of `components` (a family's graphs): `recipe` ("int8": static only for the U-Net),
    then `overrides` (one for "text_encoder" applies to every text encoder)."""
    if fmt not in FORMATS:
        raise EdgesdError(f"unknown format '{fmt}'", f"choose one of: {', '.join(FORMATS)}")
    for name in [recipe, *(overrides or {}).values()]:
        if name not in RECIPES:
            raise EdgesdError(f"unknown recipe '{name}'", f"choose one of: {', '.join(FORMAT_RECIPES[fmt])}")
        if name not in FORMAT_RECIPES[fmt]:
            other = next(f for f in FORMATS if name in FORMAT_RECIPES[f])
            raise EdgesdError(f"the {name} recipe cannot be written as {fmt}",
                              f"use --format {other}, or one of: {', '.join(FORMAT_RECIPES[fmt])}")
    chosen = {c: OTHER_GRAPHS.get(recipe, {}).get(_kind(c), recipe) for c in components}
    for component, name in (overrides or {}).items():
        if component not in COMPONENTS:
            raise EdgesdError(f"unknown component '{component}'", f"choose one of: {', '.join(COMPONENTS)}")
        for target in components:
            if target == component or (component == "text_encoder" and target.startswith("text_encoder")):
                chosen[target] = _calibratable(target, name)
    return chosen


def graph_file_format(component: str, recipe: Recipe, fmt: Format) -> Format:
    """The format `component`'s graph is written in: the export's, but for the static int8 VAE decoder, always
    ONNX (QDQ): OpenVINO reads it and runs it in int8, and NNCF would quantize its latent input (see
    quantize.KEEP_FLOAT). A folder may mix formats; the runtime goes by each component's file."""
    return "onnx" if component == "vae_decoder" and recipe in CALIBRATED else fmt


def _calibratable(component: str, recipe: Recipe) -> Recipe:
    """`recipe` for `component`, checked: static activation quantization only where CALIBRATED_GRAPHS says."""
    if recipe not in CALIBRATED or recipe in CALIBRATED_GRAPHS.get(component, ()):
        return recipe
    if component in UNCALIBRATED_STAND_IN:
        return UNCALIBRATED_STAND_IN[component]
    raise EdgesdError(f"the {recipe} recipe (static activation quantization) is not for the {component}",
                      "use int8-weights for it")


def lossless_passes(path: Path, attention: Attention = "fused") -> None:
    """What every traced graph gets before its parity check: attention fused (fusion.py; on ONNX Runtime's
    CPU EP the SD 1.5 U-Net at 512x512 ran 15% (fp32) to 20% (int8) faster with a quarter less peak memory,
    on the CUDA EP twice as fast in half the memory), unless `attention` is "unfused", and repeated
    embedding rows stored once (the tables are small: they stay in model.onnx)."""
    import onnx

    from .components import save_graph
    from .fusion import fuse_attention

    # The graph alone first: an fp32 export of SD 1.5 should not read its 3.4 GB of U-Net weights back.
    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model) if attention == "fused" else 0
    if dedupe_gather_tables(model.graph):
        onnx.load_external_data_for_model(model, str(path.parent))  # all of it, before the file is rewritten
        save_graph(model, path)
    elif fused:
        onnx.save_model(model, str(path))  # the weights stay where they are, in model.onnx_data if large


def write_recipe(src: Path, dst: Path, recipe: Recipe, calibration: list | None = None,
                 component: str = "unet") -> None:
    """Write the graph at `src` (fp32), the model's `component`, in `recipe` to `dst` (a path in another
    folder)."""
    import shutil

    import onnx

    from . import quantize
    from .components import save_graph

    dst.parent.mkdir(parents=True, exist_ok=True)
    if recipe == "fp32":
        for f in src.parent.iterdir():
            if f.is_file() and f.name.startswith(src.name):
                shutil.copy(f, dst.parent / f.name)
    elif recipe == "fp16":
        model = onnx.load(str(src), load_external_data=True)
        store_weights_fp16(model.graph)
        save_graph(model, dst)
    elif recipe == "fp16-compute":
        save_graph(fp16_compute_graph(src), dst)
    elif recipe == "int8-weights-fp16-compute":
        quantize.write_int8_weights_fp16_compute(src, dst)
    elif recipe == "int8-weights":
        quantize.write_int8_weights(src, dst)
    elif recipe == "int4-weights":
        quantize.write_int4_weights(src, dst)
    elif recipe == "int8":
        if not calibration:
            raise EdgesdError("the int8 recipe needs calibration inputs", "give at least one calibration prompt")
        quantize.write_int8_static(src, dst, calibration, quantize.KEEP_FLOAT[component])
    else:
        raise EdgesdError(f"unknown recipe '{recipe}'", f"choose one of: {', '.join(RECIPES)}")


def _initializers(graph) -> dict:
    return {init.name: init for init in graph.initializer}


def store_weights_fp16(graph, keep: frozenset[str] = frozenset()) -> bool:
    """Store float32 initializers of >= FP16_MIN_ELEMENTS (but those in `keep`) as float16, each behind a Cast
    to float32."""
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in graph.initializer:
        if (init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS
                or init.name in keep):
            continue
        values = numpy_helper.to_array(init)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}.to_fp32",
                                      to=TensorProto.FLOAT))
    prepend_nodes(graph, casts)
    return bool(casts)


def fp16_compute_graph(src: Path):
    """The fp32 graph at `src` (attention fused by the trace's lossless passes unless exported unfused) with
    fp16 weights and arithmetic; float32 inputs and outputs. Where the component's config.json has
    `upcast_attention` (SD 2.x, whose scores overflow fp16) attention stays float32."""
    import json

    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Types from the graph alone (shape inference of a > 2 GB proto fails), then the weights.
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    onnx.load_external_data_for_model(model, str(src.parent))
    config_file = src.parent / "config.json"
    upcast = config_file.is_file() and bool(json.loads(config_file.read_text()).get("upcast_attention"))
    keep = attention_nodes(model.graph) if upcast else []
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                    op_block_list=DEFAULT_OP_BLOCK_LIST, node_block_list=keep)


def attention_nodes(graph) -> list[str]:
    """Fused attention nodes, and the nodes from each unfused Softmax back to its Q·K^T MatMul (the scale and
    mask between them): what computes scores of (B, heads, Q, K), which overflow fp16 in SD 2.x (diffusers'
    upcast_attention)."""
    made_by = {out: node for node in graph.node for out in node.output}
    names = [node.name for node in graph.node if node.op_type == "MultiHeadAttention"]
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        current = made_by.get(node.input[0])
        while current is not None and current.op_type in ("Mul", "Div", "Add", "Where", "MatMul"):
            names.append(current.name)
            if current.op_type == "MatMul":
                break
            current = next((made_by[i] for i in current.input if i in made_by), None)
    return names


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
    prepend_nodes(graph, added)
    return changed


def prepend_nodes(graph, nodes: list) -> None:
    """Put `nodes` first (their inputs are graph inputs or initializers), keeping the graph sorted."""
    if not nodes:
        return
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
