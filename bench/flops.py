"""Counts a graph's FLOPs from its static shapes (one multiply-add = 2 FLOPs), for the roofline.

    .venv/bin/python bench/flops.py bench/work/sd15-random-onnx/unet/model.onnx sample=2,4,64,64 \
        timestep=2 encoder_hidden_states=2,77,768

OpenVINO reads the graph (ONNX or IR) and propagates the given input shapes through it, so every node has a
static shape; then Convolution / GroupConvolution / ConvolutionBackpropData / MatMul and fused attention
(ScaledDotProductAttention, what OpenVINO makes of a com.microsoft.MultiHeadAttention node: Q K^T and the
weighted sum of V) are counted from their shapes. Element-wise work (normalisations, activations, softmax) is left out: it is memory-bound and small
next to these (a few percent of the FLOPs).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path


def count_flops(path: Path, shapes: dict[str, tuple[int, ...]]) -> Counter:
    """FLOPs per op type of one call of the graph at `shapes`."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    model.reshape({name: ov.PartialShape(list(dims)) for name, dims in shapes.items()})
    flops: Counter = Counter()
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul",
                        "ScaledDotProductAttention"):
            continue
        out = node.get_output_shape(0)
        a, w = (node.get_input_shape(i) for i in (0, 1))
        if kind == "ScaledDotProductAttention":  # q (..., S, D), k (..., L, D), out (..., S, Dv)
            keys = node.get_input_shape(1)[-2]
            flops[kind] += 2 * math.prod(a) * keys + 2 * math.prod(out) * keys
        elif kind == "MatMul":
            ta, tb = node.get_attributes()["transpose_a"], node.get_attributes()["transpose_b"]
            k = a[-2] if ta else a[-1]
            flops[kind] += 2 * math.prod(out) * k
        elif kind == "Convolution":  # w: (Cout, Cin, kh, kw)
            flops[kind] += 2 * math.prod(out) * math.prod(w[1:])
        elif kind == "GroupConvolution":  # w: (groups, Cout/g, Cin/g, kh, kw)
            flops[kind] += 2 * math.prod(out) * math.prod(w[2:])
        else:  # transposed convolution: every input element meets Cout * kh * kw weights
            flops[kind] += 2 * math.prod(a) * math.prod(w[1:])
    return flops


def main() -> None:
    path, *dims = sys.argv[1:]
    shapes = {d.split("=")[0]: tuple(int(x) for x in d.split("=")[1].split(",")) for d in dims}
    flops = count_flops(Path(path), shapes)
    for kind, n in flops.most_common():
        print(f"{kind:26s} {n / 1e12:8.3f} TFLOP")
    print(f"{'total':26s} {sum(flops.values()) / 1e12:8.3f} TFLOP")


if __name__ == "__main__":
    main()
