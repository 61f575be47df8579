"""Attention fusion: torch's exported scaled-dot-product attention as one ONNX Runtime MultiHeadAttention node.

torch.onnx writes `F.scaled_dot_product_attention` (diffusers' attention) as about a dozen nodes:

    q (B, S, H*D) -> Reshape (B, S, H, D) -> Transpose (B, H, S, D) -> Mul sqrt(scale) --\
    k (B, L, H*D) -> Reshape (B, L, H, D) -> Transpose (B, H, D, L) -> Mul sqrt(scale) -- MatMul (B, H, S, L)
        -> Softmax -> MatMul with v (Reshape, Transpose (B, H, L, D)) -> Transpose (B, S, H, D) -> Reshape (B, S, H*D)

which holds the (B, H, S, L) scores in memory: 2 x 8 x 4096 x 4096 for SD 1.5 at 512x512, 512 MB in fp16 and
twice that again for the softmax. `com.microsoft.MultiHeadAttention` takes q, k, v as (B, S, H*D) and runs fused
kernels (flash / memory-efficient attention on CUDA) that never store the scores. Only the exact pattern with
the default scale 1/sqrt(D) (Vaswani et al. 2017, Eq. 1) is replaced; anything else is left as it is.
"""

from __future__ import annotations

import numpy as np

MS_DOMAIN = "com.microsoft"


class _Graph:
    """Who makes and who reads each value of an ONNX graph, and the value of constants."""

    def __init__(self, graph):
        self.graph = graph
        self.maker = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def made_by(self, name: str, op_type: str, perm: list[int] | None = None):
        node = self.maker.get(name)
        if node is None or node.op_type != op_type:
            return None
        if perm is not None and _attribute(node, "perm") != perm:
            return None
        return node

    def only_reader(self, name: str, op_type: str, perm: list[int] | None = None):
        readers = self.readers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op_type:
            return None
        if perm is not None and _attribute(readers[0], "perm") != perm:
            return None
        return readers[0]

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.maker.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _attribute(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _heads(g: _Graph, reshape) -> int | None:
    """H from a Reshape to (B, S, H, D) whose shape is a Concat of [B, -1, H, D] (H a constant)."""
    concat = g.made_by(reshape.input[1], "Concat")
    if concat is None or len(concat.input) != 4:
        return None
    value = g.constant(concat.input[2])
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 and value.reshape(-1)[0] > 0 else None


def _scaled(g: _Graph, name: str, perm: list[int]):
    """(Mul, Transpose, Reshape) of q or k: Reshape -> Transpose(perm) -> Mul by a computed sqrt of the default
    scale (a Sqrt node: torch's export of scale=None); None if `name` is not made so."""
    mul = g.made_by(name, "Mul")
    if mul is None:
        return None
    for ours, theirs in ((0, 1), (1, 0)):
        transpose = g.made_by(mul.input[ours], "Transpose", perm)
        if transpose is not None and g.made_by(mul.input[theirs], "Sqrt") is not None:
            reshape = g.made_by(transpose.input[0], "Reshape")
            return (mul, transpose, reshape) if reshape is not None else None
    return None


def _match(g: _Graph, softmax) -> tuple[list, list[str], str, int] | None:
    """The nodes of one attention around `softmax`, its q, k, v projections, its output and its head count."""
    if _attribute(softmax, "axis") not in (-1, 3):
        return None
    scores = g.made_by(softmax.input[0], "MatMul")
    if scores is None:
        return None
    q, k = _scaled(g, scores.input[0], [0, 2, 1, 3]), _scaled(g, scores.input[1], [0, 2, 3, 1])
    mixed = g.only_reader(softmax.output[0], "MatMul")
    if q is None or k is None or mixed is None or mixed.input[0] != softmax.output[0]:
        return None
    v_transpose = g.made_by(mixed.input[1], "Transpose", [0, 2, 1, 3])
    v_reshape = g.made_by(v_transpose.input[0], "Reshape") if v_transpose is not None else None
    back = g.only_reader(mixed.output[0], "Transpose", [0, 2, 1, 3])
    merged = g.only_reader(back.output[0], "Reshape") if back is not None else None
    if v_reshape is None or merged is None:
        return None
    heads = _heads(g, q[2])
    if heads is None or heads != _heads(g, k[2]) or heads != _heads(g, v_reshape):
        return None
    inner = [*q, *k, scores, softmax, mixed, v_transpose, v_reshape, back]
    for node in inner:  # intermediate values are read inside the pattern, or by the scale's shape arithmetic
        for out in node.output:
            if any(reader not in inner and reader is not merged and reader.op_type != "Shape"
                   for reader in g.readers.get(out, [])):
                return None
    return [*inner, merged], [q[2].input[0], k[2].input[0], v_reshape.input[0]], merged.output[0], heads


def fuse_attention(model) -> int:
    """Replace each matched attention of `model` (a ModelProto) in place; returns how many."""
    from onnx import helper

    g = _Graph(model.graph)
    replaced: dict[int, object] = {}  # id of the pattern's last node -> its MultiHeadAttention
    removed: set[int] = set()
    for node in list(model.graph.node):
        if node.op_type != "Softmax" or id(node) in removed:
            continue
        found = _match(g, node)
        if found is None:
            continue
        nodes, (q, k, v), out, heads = found
        removed |= {id(n) for n in nodes}
        replaced[id(nodes[-1])] = helper.make_node("MultiHeadAttention", [q, k, v], [out], domain=MS_DOMAIN,
                                                   name=f"{node.name}.fused", num_heads=heads)
    if not replaced:
        return 0
    gone = {out for n in model.graph.node if id(n) in removed for out in n.output} - {
        out for n in replaced.values() for out in n.output}
    kept = _read_only([replaced.get(id(n), n) for n in model.graph.node if id(n) not in removed or id(n) in replaced],
                      {o.name for o in model.graph.output})
    if any(name in gone for n in kept for name in n.input):  # shape arithmetic that is read elsewhere too
        return 0
    del model.graph.node[:]
    model.graph.node.extend(kept)
    read = {name for node in kept for name in node.input} | {o.name for o in model.graph.output}
    unread = [init for init in model.graph.initializer if init.name not in read]  # the scale's constants
    for init in unread:
        model.graph.initializer.remove(init)
    import_ms_domain(model)
    return len(replaced)


def import_ms_domain(model) -> None:
    """Declare ONNX Runtime's com.microsoft operator set (its contrib ops) in `model`, once."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _read_only(nodes: list, wanted: set[str]) -> list:
    """`nodes` less those none of whose outputs is read (the scale arithmetic fused patterns left behind)."""
    while True:
        read = wanted | {name for node in nodes for name in node.input}
        kept = [n for n in nodes if any(out in read for out in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
