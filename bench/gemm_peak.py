"""This machine's GEMM peaks as ONNX Runtime and OpenVINO reach them: fp32 MatMul and int8 (u8 x s8) MatMul.

    .venv/bin/python bench/gemm_peak.py [--n 2048] [--runs 5]

One square N x N x N product per run, best of --runs, all cores: ONNX Runtime `MatMul` (fp32) and
`MatMulInteger` (uint8 x int8 -> int32), and OpenVINO MatMul in f32 and as a FakeQuantize-d int8 MatMul
(what a quantized model runs). Results (GFLOP/s or GOP/s, 2 N^3 per product):
bench/results/gemm-peak-vm-<date>.json. The U-Net's share of peak is its operations per step over
these peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def best(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ort_peaks(n: int, runs: int) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    out = {}
    for name, op, a_type, b_type, a, b in (
            ("onnxruntime fp32 MatMul", "MatMul", TensorProto.FLOAT, TensorProto.FLOAT,
             rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)),
            ("onnxruntime u8 x s8 MatMulInteger", "MatMulInteger", TensorProto.UINT8, TensorProto.INT8,
             rng.integers(0, 255, (n, n), dtype=np.uint8), rng.integers(-127, 127, (n, n), dtype=np.int8))):
        out_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], "gemm",
                                  [helper.make_tensor_value_info("a", a_type, [n, n])],
                                  [helper.make_tensor_value_info("c", out_type, [n, n])],
                                  [helper.make_tensor("b", b_type, [n, n], b.tobytes(), raw=True)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out[name] = 2 * n**3 / best(lambda: session.run(None, {"a": a}), runs) / 1e9
    return out


def ov_peaks(n: int, runs: int) -> dict:
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    weight = rng.standard_normal((n, n), dtype=np.float32)
    out = {}
    for name, quantized in (("openvino f32 MatMul", False), ("openvino int8 MatMul (FakeQuantize)", True)):
        param = ops.parameter([n, n], np.float32, name="a")
        x, w = param, ops.constant(weight)
        if quantized:  # the pattern NNCF writes: FakeQuantize on the activation and on the weight
            lo, hi = ops.constant(np.float32(-4)), ops.constant(np.float32(4))
            x = ops.fake_quantize(x, lo, hi, lo, hi, 256)
            w = ops.fake_quantize(w, lo, hi, lo, hi, 255)
        model = ov.Model([ops.matmul(x, w, False, True)], [param], "gemm")
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        out[name] = 2 * n**3 / best(lambda: request.infer({"a": a}), runs) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    peaks = {**ort_peaks(args.n, args.runs), **ov_peaks(args.n, args.runs)}
    for name, value in peaks.items():
        print(f"{name:40} {value:8.1f} G(FL)OP/s")
    result = {"date": str(date.today()), "cores": os.cpu_count(), "n": args.n,
              "peaks_gops": {k: round(v, 1) for k, v in peaks.items()}}
    path = HERE / "results" / f"gemm-peak-vm-{date.today()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
