"""How fast the U-Net step can get on this CPU with the attention kernels ONNX Runtime and OpenVINO have.

    .venv/bin/python bench/attention_floor.py [--unet bench/work/sd15-random-onnx/unet/model.onnx] [--runs 3]

A U-Net step's work is of two kinds. Products with weights (convolutions, projections) can run at the int8
GEMM peak. The attention products (Q K^T and the weighted sum of V) multiply two activations: each runtime
computes them in its attention kernel, whatever the recipe. This script

1. counts both kinds of FLOPs in the U-Net at 512x512, batch 2 (guidance), and lists its attention shapes
   (OpenVINO reads the graph; every MultiHeadAttention node becomes a ScaledDotProductAttention);
2. times one attention of each shape with every kernel that may run it: ONNX Runtime's fused
   `com.microsoft.MultiHeadAttention` (what edgesd's ONNX graphs run), OpenVINO's ScaledDotProductAttention in
   f32 (fused), OpenVINO's decomposed MatMul-Softmax-MatMul with FakeQuantize on its four inputs (what an
   NNCF int8 U-Net holds), ONNX Runtime's decomposed one with QDQ int8 products, and, as an opt-in reference,
   OpenVINO's SDPA in bf16;
3. measures the int8 and fp32 GEMM peaks (bench/gemm_peak.py) and works out the floor of a step: the
   attention at the fastest like-for-like kernel (f32 or int8, not bf16) plus every other product at the int8
   peak, and the largest share of the int8 peak a step could reach.

The U-Net is the random-weight SD 1.5 export that bench/sd15_foundation.py builds. Results:
bench/results/attention-floor-vm-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
UNET = HERE / "work" / "sd15-random-onnx" / "unet" / "model.onnx"
# 512x512, guidance 7.5: the U-Net's batch is 2
SHAPES = {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
WEIGHT_KINDS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")


def attention_shapes(path: Path, shapes_in: dict = SHAPES) -> tuple[Counter, float, float]:
    """At these input shapes: ((batch, heads, queries, keys, head_dim) -> count, attention FLOPs, FLOPs of
    every other product)."""
    import openvino as ov

    from flops import count_flops

    model = ov.Core().read_model(str(path))
    model.reshape({name: ov.PartialShape(list(dims)) for name, dims in shapes_in.items()})
    shapes: Counter = Counter()
    for node in model.get_ordered_ops():
        if node.get_type_name() == "ScaledDotProductAttention":
            b, h, s, d = node.get_input_shape(0)  # q (B, heads, S, D); k (B, heads, L, D)
            shapes[(b, h, s, node.get_input_shape(1)[-2], d)] += 1
    if not shapes:
        raise SystemExit(f"{path}: expected fused attention nodes (an `--attention fused` export of the U-Net)")
    flops = count_flops(path, shapes_in)
    return shapes, flops["ScaledDotProductAttention"], sum(flops[k] for k in WEIGHT_KINDS)


def attention_inputs(shape: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random q (B, heads, S, D), k and v (B, heads, L, D)."""
    b, h, s, keys, d = shape
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, h, s, d), dtype=np.float32),
            *(rng.standard_normal((b, h, keys, d), dtype=np.float32) for _ in range(2)))


def ort_attention(shape: tuple, quantized: bool) -> Callable[[], np.ndarray]:
    """One attention in ONNX Runtime: the fused MultiHeadAttention node, or the decomposed products with QDQ
    on their inputs (int8 products). Returns a call giving its output (B, S, heads * D)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    b, h, s, keys, d = shape
    feeds = {name: x.transpose(0, 2, 1, 3).reshape(b, x.shape[2], h * d)  # (B, S, heads * D), as in the U-Net
             for name, x in zip("qkv", attention_inputs(shape))}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(feeds[n].shape)) for n in "qkv"]
    if not quantized:
        nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft",
                                  num_heads=h)]
        inits = []
    else:
        def heads(x, perm):  # (B, S, H*D) -> (B, H, S, D) or, for K, (B, H, D, L)
            return [helper.make_node("Reshape", [x, "split"], [x + "4"]),
                    helper.make_node("Transpose", [x + "4"], [x + "h"], perm=perm)]

        def qdq(x, scale, zero):  # x -> int8 (u8 for the probabilities) and back: ORT runs integer products
            return [helper.make_node("QuantizeLinear", [x, scale, zero], [x + "q"]),
                    helper.make_node("DequantizeLinear", [x + "q", scale, zero], [x + "dq"])]

        nodes = (heads("q", [0, 2, 1, 3]) + heads("k", [0, 2, 3, 1]) + heads("v", [0, 2, 1, 3])
                 + qdq("qh", "s_act", "z_s8") + qdq("kh", "s_act", "z_s8") + qdq("vh", "s_act", "z_s8")
                 + [helper.make_node("MatMul", ["qhdq", "khdq"], ["scores"]),
                    helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
                    helper.make_node("Softmax", ["scaled"], ["p"], axis=-1)]
                 + qdq("p", "s_p", "z_u8")
                 + [helper.make_node("MatMul", ["pdq", "vhdq"], ["o4"]),
                    helper.make_node("Transpose", ["o4"], ["o"], perm=[0, 2, 1, 3]),
                    helper.make_node("Reshape", ["o", "merge"], ["out"])])
        inits = [helper.make_tensor("split", TensorProto.INT64, [4], [0, 0, h, d]),
                 helper.make_tensor("merge", TensorProto.INT64, [3], [0, 0, h * d]),
                 helper.make_tensor("scale", TensorProto.FLOAT, [], [d ** -0.5]),
                 helper.make_tensor("s_act", TensorProto.FLOAT, [], [RANGE / 127]),
                 helper.make_tensor("s_p", TensorProto.FLOAT, [], [1 / 255]),
                 helper.make_tensor("z_s8", TensorProto.INT8, [], [0]),
                 helper.make_tensor("z_u8", TensorProto.UINT8, [], [0])]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [b, s, h * d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(
        "com.microsoft", 1)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)[0]


def ov_attention(shape: tuple, int8: bool, precision: str) -> Callable[[], np.ndarray]:
    """One attention in OpenVINO: the fused ScaledDotProductAttention op, or (int8) MatMul-Softmax-MatMul with
    FakeQuantize on q, k, the probabilities and v, as NNCF quantizes it. Returns a call giving its output
    (B, S, heads * D)."""
    import openvino as ov
    import openvino.opset13 as ops

    b, h, s, keys, d = shape
    q, k, v = (ops.parameter([b, h, n, d], np.float32, name=name) for name, n in (("q", s), ("k", keys), ("v", keys)))
    if not int8:
        out = ops.scaled_dot_product_attention(q, k, v, causal=False)
    else:
        def fq(x, lo, hi):
            low, high = ops.constant(np.float32(lo)), ops.constant(np.float32(hi))
            return ops.fake_quantize(x, low, high, low, high, 256)

        scores = ops.multiply(ops.matmul(fq(q, -RANGE, RANGE), fq(k, -RANGE, RANGE), False, True),
                              ops.constant(np.float32(d ** -0.5)))
        out = ops.matmul(fq(ops.softmax(scores, -1), 0, 1), fq(v, -RANGE, RANGE), False, False)
    compiled = ov.Core().compile_model(ov.Model([out], [q, k, v], "attention"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    feeds = dict(zip("qkv", attention_inputs(shape)))
    return lambda: request.infer(feeds)[0].transpose(0, 2, 1, 3).reshape(b, s, h * d)


RANGE = 4.0  # the int8 kernels' activation range (inputs are standard normal)
# name -> (builder of a call for a shape, like for like: f32 or int8 arithmetic, not bf16)
KERNELS: dict[str, tuple[Callable[[tuple], Callable[[], np.ndarray]], bool]] = {
    "onnxruntime MultiHeadAttention f32": (lambda shape: ort_attention(shape, quantized=False), True),
    "onnxruntime QDQ int8 products": (lambda shape: ort_attention(shape, quantized=True), True),
    "openvino SDPA f32": (lambda shape: ov_attention(shape, int8=False, precision="f32"), True),
    "openvino FakeQuantize int8 products": (lambda shape: ov_attention(shape, int8=True, precision="f32"), True),
    "openvino SDPA bf16 (opt-in)": (lambda shape: ov_attention(shape, int8=False, precision="bf16"), False),
}


def main() -> None:
    import gemm_peak
    from recipes_backends import machine
    from side_by_side import peaks_by_kind

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", type=Path, default=UNET)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated, of: " + ", ".join(KERNELS))
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise SystemExit(f"unknown kernel {unknown[0]!r}; known: {', '.join(KERNELS)}")
    shapes, attention_flops, weight_flops = attention_shapes(args.unet)
    peaks = peaks_by_kind({**gemm_peak.ort_peaks(2048, 5), **gemm_peak.ov_peaks(2048, 5)})
    rows = []
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][2] * kv[0][3]):
        row = {"shape": list(shape), "count": count, "gflop": round(4 * math.prod(shape) / 1e9, 3), "s": {}}
        for kernel in kernels:
            row["s"][kernel] = round(gemm_peak.best(KERNELS[kernel][0](shape), args.runs), 4)
            print(shape, count, kernel, row["s"][kernel], flush=True)
        rows.append(row)
    totals = {k: round(sum(r["count"] * r["s"][k] for r in rows), 3) for k in kernels}
    like = [k for k in kernels if KERNELS[k][1]]
    # the floor: each attention shape at its fastest like-for-like kernel, every other product at the int8 peak
    attention_floor = sum(r["count"] * min(r["s"][k] for k in like) for r in rows)
    weights_floor = weight_flops / (peaks["int8"] * 1e9)
    step_floor = attention_floor + weights_floor
    total_flops = attention_flops + weight_flops
    result = {"date": str(date.today()), "machine": machine(), "unet": str(args.unet), "shapes": SHAPES,
              "peaks_gops": peaks, "attention_gflop": round(attention_flops / 1e9, 1),
              "other_gflop": round(weight_flops / 1e9, 1), "rows": rows, "attention_s_per_step": totals,
              "floor": {"attention_s": round(attention_floor, 3), "other_products_s": round(weights_floor, 3),
                        "step_s": round(step_floor, 3),
                        "max_int8_peak_share": round(total_flops / (peaks["int8"] * 1e9) / step_floor, 3)}}
    out = HERE / "results" / f"attention-floor-vm-{date.today()}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result, kernels))
    print(markdown(result, kernels))
    print(f"wrote {out}.json and .md")


def markdown(result: dict, kernels: list[str]) -> str:
    m, floor, peaks = result["machine"], result["floor"], result["peaks_gops"]
    lines = [f"Attention kernels and the U-Net step's floor (`bench/attention_floor.py`; SD 1.5 architecture, "
             f"512x512, batch 2; {m['cpu']}, {m['cores']} cores, {', '.join(m['isa'])}; {result['date']}).",
             "",
             f"Per step: {result['attention_gflop']} GFLOP in attention products (Q K^T, P V), "
             f"{result['other_gflop']} GFLOP in every other product. GEMM peaks measured in this run: int8 "
             f"{peaks['int8']:.0f} GOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s.", "",
             "| (batch, heads, queries, keys, dim) | per step | GFLOP | "
             + " | ".join(f"{k} s" for k in kernels) + " |",
             "|---|---:|---:|" + "---:|" * len(kernels)]
    for r in result["rows"]:
        lines.append(f"| {tuple(r['shape'])} | {r['count']} | {r['gflop']} | "
                     + " | ".join(f"{r['s'][k]:.4f}" for k in kernels) + " |")
    lines.append("| **per step** | | | " + " | ".join(f"**{result['attention_s_per_step'][k]:.3f}**" for k in kernels)
                 + " |")
    lines += ["", f"Floor of a step: attention at the fastest like-for-like kernel per shape {floor['attention_s']} s "
              f"+ every other product at the int8 peak {floor['other_products_s']} s = **{floor['step_s']} s**, "
              f"i.e. at most **{floor['max_int8_peak_share'] * 100:.0f}%** of the int8 peak for the whole step.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
