"""Token merging in the U-Net's self-attention (ToMe for SD, Bolya & Hoffman 2023), cut into an exported ONNX U-Net.

Before each self-attention (attn1) of the merged levels, the tokens x (B, N, C) of the level's h x w grid are
split into dst (one token of each 2x2 cell, its top-left) and src (the other three); each src token finds its
most similar dst token (cosine similarity), and the r = floor(ratio x N) src tokens with the most similar
partners are averaged into them (bipartite soft matching, Bolya et al. 2023, Sec. 3). The attention runs on the
N - r tokens left; after it, every merged src token takes its dst token's output (unmerging, ToMe for SD
Sec. 3). Only the self-attention is merged, at the full-resolution level by default (the paper's defaults).

The graph `unet/model_tome.onnx` is the exported U-Net with those nodes added and the ratio as an input, so
one graph takes any ratio. It sits beside the U-Net's graph and reads the U-Net's own weights file (no copy,
no link: onnx refuses to load an external data file with several hard links). The
cut ends with a parity check: at ratio 0 nothing is merged and the graph must give the U-Net's output.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx  # noqa: F401  (the `export` extra; edgesd tome says so when it is missing)

from edgesd.errors import EdgesdError
from edgesd.graphs import TOME_RATIO, UNET_TOME
from edgesd.model import MANIFEST, ModelFolder

from .added import cpu_session, folder_to_add_to
from .parity import ParityResult, compare

# At ratio 0 the merge and unmerge are a permutation and its inverse: anything under this is a bad cut.
UNMERGED_MIN_PSNR_DB = 60.0
PARITY_LATENT_SIZE = 16
# the merged levels: 1 = the full-resolution blocks only (ToMe for SD's default), 2 = those and the next, ...
DEFAULT_LEVELS = 1
BLOCK = re.compile(r"^(.*/(down|up)_blocks\.(\d+)/attentions\.\d+/transformer_blocks\.\d+)/attn1/")


def self_attention_blocks(graph, levels: int) -> list[tuple[str, int]]:
    """(transformer block name scope, level) of every self-attention at levels 1..`levels` (level 1: the
    U-Net's full resolution), found by the module names torch's exporter gives the nodes."""
    ups = [int(m.group(1)) for n in graph.node if (m := re.search(r"/up_blocks\.(\d+)/", n.name))]
    if not ups:
        raise EdgesdError("the U-Net graph has no up-block node names (not a diffusers U-Net export)",
                          "add token merging to an `edgesd export` or `optimum-cli export onnx` U-Net")
    blocks = {}
    for node in graph.node:
        if m := BLOCK.match(node.name):
            index = int(m.group(3))
            level = index + 1 if m.group(2) == "down" else max(ups) + 1 - index
            if level <= levels:
                blocks[m.group(1)] = level
    return list(blocks.items())  # in the graph's order


class _Builder:
    """Appends nodes (and constant initializers) to an ONNX graph under one name prefix."""

    def __init__(self, graph, prefix: str, opset: int):
        self.graph, self.prefix, self.opset, self.count = graph, prefix, opset, 0
        self.nodes: list = []

    def _name(self) -> str:
        self.count += 1
        return f"{self.prefix}/{self.count}"

    def const(self, values, dtype=np.int64) -> str:
        from onnx import numpy_helper

        name = self._name()
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes):
        from onnx import helper

        name = self._name()
        names = [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, **attributes))
        return names[0] if outputs == 1 else names

    def reduce(self, op_type: str, x: str, axis: int, keepdims: int) -> str:
        """A Reduce* node over one axis (its axes an input from opset 18, an attribute before)."""
        if self.opset >= 18:
            return self.op(op_type, x, self.const([axis]), keepdims=keepdims)
        return self.op(op_type, x, axes=[axis], keepdims=keepdims)


def _level_grid(b: _Builder, sample: str, level: int) -> dict[str, str]:
    """int64 (1,) tensors of the level's grid from the sample's (B, C, H, W): h and w (each down block's
    stride-2 convolution takes a side s to ceil(s / 2)), the 2x2 cells' h/2, w/2 and their count."""
    shape = b.op("Shape", sample)
    h, w = b.op("Slice", shape, b.const([2]), b.const([3])), b.op("Slice", shape, b.const([3]), b.const([4]))
    one, two = b.const([1]), b.const([2])
    for _ in range(level - 1):
        h, w = b.op("Div", b.op("Add", h, one), two), b.op("Div", b.op("Add", w, one), two)
    h2, w2 = b.op("Div", h, two), b.op("Div", w, two)
    return {"h2": h2, "w2": w2, "cells": b.op("Mul", h2, w2), "tokens": b.op("Mul", h, w)}


def _merge(b: _Builder, x: str, ratio: str, grid: dict[str, str]) -> tuple[str, dict[str, str]]:
    """x (B, N, C) -> merged (B, N - r, C), and what the unmerge needs."""
    zero, one, last = b.const([0]), b.const([1]), b.const([np.iinfo(np.int64).max])
    # (B, N, C) -> (B, h/2, 2, w/2, 2, C) -> (B, h/2, w/2, 2, 2, C) -> (B, cells, 4, C)
    grid6 = b.op("Concat", zero, grid["h2"], b.const([2]), grid["w2"], b.const([2]), b.const([-1]), axis=0)
    cells = b.op("Reshape", b.op("Transpose", b.op("Reshape", x, grid6), perm=[0, 1, 3, 2, 4, 5]),
                 b.op("Concat", zero, grid["cells"], b.const([4]), b.const([-1]), axis=0))
    dst = b.op("Reshape", b.op("Slice", cells, zero, one, b.const([2])),
               b.op("Concat", zero, grid["cells"], b.const([-1]), axis=0))  # (B, Nd, C): each cell's top-left
    src = b.op("Reshape", b.op("Slice", cells, one, b.const([4]), b.const([2])),
               b.op("Concat", zero, b.op("Mul", grid["cells"], b.const([3])), b.const([-1]), axis=0))  # (B, Ns, C)
    # cosine similarity of every src to every dst token, in fp32 whatever the graph computes in
    a, d = (b.op("Cast", t, to=onnx.TensorProto.FLOAT) for t in (src, dst))
    a, d = (b.op("Div", t, b.reduce("ReduceL2", t, -1, keepdims=1)) for t in (a, d))
    scores = b.op("MatMul", a, b.op("Transpose", d, perm=[0, 2, 1]))  # (B, Ns, Nd)
    best = b.reduce("ReduceMax", scores, -1, keepdims=0)  # (B, Ns)
    partner = b.op("ArgMax", scores, axis=-1, keepdims=0)  # (B, Ns)
    src_count = b.op("Slice", b.op("Shape", src), one, b.const([2]))
    order = b.op("TopK", best, src_count, axis=-1, largest=1, sorted=1, outputs=2)[1]  # (B, Ns), most similar first
    # r = min(floor(ratio x N), Ns) tokens merged away
    removed = b.op("Cast", b.op("Floor", b.op("Mul", b.op("Cast", grid["tokens"], to=onnx.TensorProto.FLOAT), ratio)),
                   to=onnx.TensorProto.INT64)
    removed = b.op("Min", removed, src_count)
    merged_idx = b.op("Slice", order, zero, removed, one)  # (B, r)
    kept_idx = b.op("Slice", order, removed, last, one)  # (B, Ns - r)
    into = b.op("GatherElements", partner, merged_idx, axis=1)  # (B, r): each merged token's dst

    channels = b.op("Slice", b.op("Shape", x), b.const([2]), b.const([3]))
    spread = b.op("Concat", one, one, channels, axis=0)

    def per_channel(idx: str) -> str:  # (B, k) -> (B, k, C)
        return b.op("Expand", b.op("Unsqueeze", idx, b.const([-1])), spread)

    merged_e, kept_e, into_e = per_channel(merged_idx), per_channel(kept_idx), per_channel(into)
    kept = b.op("GatherElements", src, kept_e, axis=1)
    moved = b.op("GatherElements", src, merged_e, axis=1)
    # each dst token: the mean of itself and the src tokens merged into it
    total = b.op("ScatterElements", dst, into_e, moved, axis=1, reduction="add")
    ones_d = b.op("CastLike", b.op("ConstantOfShape", b.op("Concat", b.op("Shape", dst, end=2), one, axis=0),
                                   value=onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])), dst)
    ones_m = b.op("CastLike", b.op("ConstantOfShape", b.op("Concat", b.op("Shape", merged_idx), one, axis=0),
                                   value=onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])), dst)
    count = b.op("ScatterElements", ones_d, b.op("Unsqueeze", into, b.const([-1])), ones_m, axis=1, reduction="add")
    merged = b.op("Concat", kept, b.op("Div", total, count), axis=1)  # (B, N - r, C)
    kept_count = b.op("Slice", b.op("Shape", kept_idx), one, b.const([2]))
    # the inverse permutation of `order` (B, Ns), by a scatter of int64 rows (cheaper than one of (B, Ns, C))
    rows = b.op("CumSum", b.op("ConstantOfShape", b.op("Shape", order),
                               value=onnx.helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1])), b.const(1))
    back = b.op("ScatterElements", order, order, b.op("Sub", rows, one), axis=1)
    return merged, {"back_e": per_channel(back), "into_e": into_e, "kept_count": kept_count}


def _unmerge(b: _Builder, y: str, m: dict[str, str], grid: dict[str, str]) -> str:
    """The attention's output y (B, N - r, C) -> (B, N, C): a merged src token takes its dst token's output."""
    zero, one, last = b.const([0]), b.const([1]), b.const([np.iinfo(np.int64).max])
    kept = b.op("Slice", y, zero, m["kept_count"], one)  # (B, Ns - r, C)
    dst = b.op("Slice", y, m["kept_count"], last, one)  # (B, Nd, C)
    moved = b.op("GatherElements", dst, m["into_e"], axis=1)  # (B, r, C)
    # back to src order: token `order[j]` is row j of (merged, kept); gather each src token's row
    src = b.op("GatherElements", b.op("Concat", moved, kept, axis=1), m["back_e"], axis=1)  # (B, Ns, C)
    cells = b.op("Concat", b.op("Unsqueeze", dst, b.const([2])),
                 b.op("Reshape", src, b.op("Concat", zero, grid["cells"], b.const([3]), b.const([-1]), axis=0)),
                 axis=2)  # (B, cells, 4, C)
    # (B, cells, 4, C) -> (B, h/2, w/2, 2, 2, C) -> (B, h/2, 2, w/2, 2, C) -> (B, N, C)
    cells6 = b.op("Concat", zero, grid["h2"], grid["w2"], b.const([2]), b.const([2]), b.const([-1]), axis=0)
    return b.op("Reshape", b.op("Transpose", b.op("Reshape", cells, cells6), perm=[0, 1, 3, 2, 4, 5]),
                b.op("Concat", zero, grid["tokens"], b.const([-1]), axis=0))


def _attention_ends(graph, scope: str, computed: set[str]) -> tuple[str, str]:
    """The one computed tensor flowing into `scope`'s nodes (the normalised tokens) and the one flowing out;
    `computed`: the tensors that depend on the graph's inputs (not weights, constants or their casts)."""
    inside = [n for n in graph.node if n.name.startswith(scope)]
    made_inside = {o for n in inside for o in n.output}
    entering = {i for n in inside for i in n.input if i in computed and i not in made_inside}
    leaving = {i for n in graph.node if not n.name.startswith(scope) for i in n.input if i in made_inside}
    leaving |= {o.name for o in graph.output if o.name in made_inside}
    if len(entering) != 1 or len(leaving) != 1:
        raise EdgesdError(f"the U-Net's self-attention {scope} has {len(entering)} inputs and {len(leaving)} "
                          "outputs from other nodes (expected one each)", "add token merging to an `edgesd "
                          "export` or `optimum-cli export onnx` U-Net of an fp32, fp16 or int8 (QDQ) recipe")
    return entering.pop(), leaving.pop()


def _merge_point(graph, x: str, scope: str) -> tuple[str, list]:
    """Where the merge goes, and the nodes to read the merged tokens: before the attention's input `x`, or
    where `x` is a static int8 recipe's QuantizeLinear -> DequantizeLinear of the normalised tokens, before that
    pair (a per-tensor quantization commutes with moving tokens, and ONNX Runtime's int8 kernels still see
    DequantizeLinear -> MatMul)."""
    maker = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dq = maker.get(x)
    q = maker.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is not None and q.op_type == "QuantizeLinear" and len(readers[q.output[0]]) == 1 \
            and len(readers[q.input[0]]) == 1 and all(n.name.startswith(scope) for n in readers[x]):
        return q.input[0], [q]
    return x, [n for n in readers[x] if n.name.startswith(scope)]


def _computed(graph) -> set[str]:
    """The tensors that depend on the graph's inputs (its nodes are in topological order)."""
    computed = {t.name for t in graph.input}
    for node in graph.node:
        if any(i in computed for i in node.input):
            computed.update(node.output)
    return computed


def _cut(unet_path: Path, out: Path, levels: int) -> int:
    """Write the token-merging U-Net to `out`, in the U-Net's folder (its weights: the U-Net's own data file,
    by the same relative name); returns the
    number of merged self-attentions."""
    from onnx import helper

    model = onnx.load(str(unet_path), load_external_data=False)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 16:
        raise EdgesdError(f"the U-Net graph has ONNX opset {opset}; token merging needs 16 or later "
                          "(ScatterElements' reduction)", "export the model again with edgesd")
    if TOME_RATIO.name in {i.name for i in graph.input}:
        raise EdgesdError(f"{unet_path} takes '{TOME_RATIO.name}' already", "token merging is in this graph")
    blocks = self_attention_blocks(graph, levels)
    if not blocks:
        raise EdgesdError(f"the U-Net has no self-attention at levels 1-{levels} (SDXL's first level has none)",
                          f"pass --levels {levels + 1}")
    graph.input.append(helper.make_tensor_value_info(TOME_RATIO.name, onnx.TensorProto.FLOAT, list(TOME_RATIO.dims)))
    ratio = TOME_RATIO.name
    grids: dict[int, dict[str, str]] = {}
    computed = _computed(graph)
    added = _Builder(graph, "tome/grid", opset)
    for scope, level in blocks:
        if level not in grids:
            added.prefix = f"tome/level{level}"
            grids[level] = _level_grid(added, "sample", level)
        x, y = _attention_ends(graph, f"{scope}/attn1/", computed)
        x, readers = _merge_point(graph, x, f"{scope}/attn1/")
        b = _Builder(graph, f"tome{scope}", opset)
        merged, m = _merge(b, x, ratio, grids[level])
        for node in readers:  # the attention reads the merged tokens
            node.input[:] = [merged if name == x else name for name in node.input]
        restored = _unmerge(b, y, m, grids[level])
        for node in graph.node:  # and the rest of the block its unmerged output
            if not node.name.startswith(f"{scope}/attn1/"):
                node.input[:] = [restored if name == y else name for name in node.input]
        added.nodes += b.nodes
    # the added nodes are appended: put each before its first reader
    _insert_sorted(graph, added.nodes)
    # the U-Net's prediction only (a DeepCache export's deep features are not this graph's)
    kept = [o for o in graph.output if o.name == "out_sample"]
    del graph.output[:]
    graph.output.extend(kept)
    onnx.save(model, str(out))
    return len(blocks)


def _insert_sorted(graph, nodes: list) -> None:
    """The graph's nodes and `nodes` in one topological order."""
    everything = list(graph.node) + nodes
    maker = {o: i for i, n in enumerate(everything) for o in n.output}
    done, order = set(), []

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if j in done:
                continue
            if expanded:
                done.add(j)
                order.append(everything[j])
                continue
            stack.append((j, True))
            stack.extend((maker[name], False) for name in everything[j].input
                         if name in maker and maker[name] not in done)

    for i in range(len(everything)):
        visit(i)
    del graph.node[:]
    graph.node.extend(order)


def _without_activation_qdq(path: Path, out: Path) -> Path:
    """`path`'s graph with every QuantizeLinear -> DequantizeLinear pair on an activation taken out, written to
    `out` (beside it: the same weights file); `path` itself where it has none. A static int8 recipe rounds
    activations at each such pair, so the merge's reordering of the tokens (the attention's sums in another
    order) moves values across rounding steps: 34-47 dB from the U-Net on the SD 1.5 int8 U-Net at ratio 0.
    Without the activation rounding (the int8 weights stay) the cut must be exact."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    replaced, dropped = {}, set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        after = readers.get(node.output[0], [])
        if after and all(n.op_type == "DequantizeLinear" for n in after):
            dropped.update(id(n) for n in (node, *after))
            replaced.update({n.output[0]: node.input[0] for n in after})
    if not replaced:
        return path
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        node.input[:] = [replaced.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    for output in graph.output:
        if output.name in replaced:  # an output made by a pair: name its float value so
            graph.node.append(onnx.helper.make_node("Identity", [replaced[output.name]], [output.name]))
    onnx.save(model, str(out))
    return out


def _parity(unet: Path, tome: Path, feeds: dict[str, np.ndarray]) -> ParityResult:
    """The token-merging graph at ratio 0 against the U-Net (ONNX Runtime CPU), both without their activations'
    int8 rounding where they have it (_without_activation_qdq)."""
    from edgesd.backends.base import fit_feeds
    from edgesd.graphs import ONNX_TO_NUMPY

    floats = [unet.with_name(f".{p.name}.float-{os.getpid()}") for p in (unet, tome)]
    try:
        whole = cpu_session(_without_activation_qdq(unet, floats[0]))
        inputs = whole.get_inputs()
        feeds = {**feeds, "timestep": np.full_like(feeds["timestep"], feeds["timestep"][0])}
        cast = fit_feeds(unet, feeds, {i.name: np.dtype(ONNX_TO_NUMPY[i.type]) for i in inputs},
                         {i.name: len(i.shape) for i in inputs})
        reference = whole.run(["out_sample"], cast)[0]
        del whole
        merged = cpu_session(_without_activation_qdq(tome, floats[1]))
        got = merged.run(["out_sample"], {**cast, TOME_RATIO.name: np.zeros(1, np.float32)})[0]
        del merged
    finally:
        for path in floats:
            path.unlink(missing_ok=True)
    return compare(UNET_TOME, "out_sample", reference.astype(np.float32), got.astype(np.float32),
                   UNMERGED_MIN_PSNR_DB)


def add_tome(root: str | Path, levels: int = DEFAULT_LEVELS) -> ParityResult:
    """Add the token-merging U-Net (`unet/model_tome.onnx`) to the exported model at `root`. Nothing changes unless it
    passes its parity check."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise EdgesdError(f"levels must be a whole number >= 1, got {levels!r}", "e.g. --levels 1 (the default)")
    folder = folder_to_add_to(root, "the token-merging U-Net", "edgesd tome")
    if folder.has(UNET_TOME):
        raise EdgesdError(f"'{folder.root}' has the token-merging U-Net already", "generate with --token-merging R")
    unet_path = folder.graph_path("unet")
    target = folder.graph_path(UNET_TOME)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        _cut(unet_path, partial, levels)
        sizes = folder.family.sample_sizes("unet", folder.configs, max(PARITY_LATENT_SIZE,
                                                                       folder.constants.latent_size_multiple))
        result = _parity(unet_path, partial, folder.specs["unet"].sample_inputs(sizes))
        if not result.passed:
            raise EdgesdError(f"the token-merging U-Net at ratio 0 is {result.psnr_db:.1f} dB from the U-Net "
                              f"(needs >= {UNMERGED_MIN_PSNR_DB}); nothing was changed",
                              "report this model to the edgesd developers")
        os.replace(partial, target)
        _update_manifest(folder, levels)
        return result
    except OSError as e:
        raise EdgesdError(f"the token-merging U-Net could not be written ({e.strerror or e})",
                          "free disk space or check the folder's permissions; nothing was changed") from None
    finally:
        partial.unlink(missing_ok=True)


def _update_manifest(folder: ModelFolder, levels: int) -> None:
    """edgesd.json (where the folder has one): the token-merging graph's entry."""
    path = folder.root / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    target = folder.graph_path(UNET_TOME)
    manifest["graphs"][UNET_TOME] = {
        **folder.specs[UNET_TOME].to_json(), "file": target.relative_to(folder.root).as_posix(), "format": "onnx",
        "precision": manifest["graphs"]["unet"].get("precision", "fp32"), "merged_levels": levels}
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
