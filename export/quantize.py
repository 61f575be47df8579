"""Integer recipes for ONNX graphs: weight-only int8, int4 MatMul weights, static W8A8 with calibration.

Each function reads an fp32 graph written by the exporter and writes the quantized graph to another path;
the fp32 graph stays, as the reference for the fidelity report.

- `write_int8_weights`: Conv / MatMul / Gemm weights as int8, symmetric per output channel, each behind a
  DequantizeLinear; the other large tensors (embeddings) stored as fp16 behind a Cast. Every op still computes
  in fp32: a quarter of the size, the same speed.
- `write_int8_weights_fp16_compute`: the fp16-compute graph (recipes.fp16_compute_graph) with its fp16 weights
  stored the same way, with fp16 scales, behind ONNX Runtime's com.microsoft.DequantizeLinear (opset 17's
  DequantizeLinear takes float32 scales only): weights a quarter of fp32's size, arithmetic in fp16.
- `write_int4_weights`: MatMul weights in 4 bits, symmetric, in blocks of INT4_BLOCK_SIZE along the input
  dimension (onnxruntime's MatMulNBits); the convolutions as in `write_int8_weights`.
- `write_int8_static`: onnxruntime's static QDQ quantization of the Conv / MatMul / Gemm ops that have a weight
  (uint8 activations: ORT's fast u8 x s8 kernels; int8 weights per channel), activation ranges from calibration
  inputs. The layers in KEEP_FLOAT stay fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .components import save_graph
from .fusion import MS_DOMAIN, import_ms_domain
from .recipes import FP16_MIN_ELEMENTS, fp16_compute_graph, prepend_nodes, store_weights_fp16

INT4_BLOCK_SIZE = 32
# Layers left in fp32 by the static recipe: the U-Net's first and last convolutions and its timestep embedding.
# They are a small share of the compute; quantizing them cost the embedded model's images several dB.
SENSITIVE_LAYERS = ("conv_in", "conv_out", "time_embedding")
# What static int8 leaves in float, per graph. In the U-Net, also the residual blocks' 1x1 shortcut
# convolutions: in the up blocks they read the concatenation of the upsampled features and the skip connection,
# two tensors of very different ranges that one activation scale cannot both hold (Q-Diffusion, Li et al. 2023,
# its shortcut-splitting quantization); with them in int8 the embedded model's IR int8 U-Net drew one prompt's triangle larger (26 dB from
# fp32, 31 dB without). They are about 2% of SD 1.5's U-Net FLOPs. The VAE decoder's post_quant_conv would quantize the latents
# themselves (the embedded model's worst picture: 26.9 dB with it, 42.3 without); its mid block runs at latent
# resolution (6% of an SD 1.5 decode's FLOPs) and adds 1.5 dB there.
KEEP_FLOAT: dict[str, tuple[str, ...]] = {"unet": SENSITIVE_LAYERS + ("conv_shortcut",),
                                          "vae_decoder": SENSITIVE_LAYERS + ("post_quant_conv", "mid_block")}
_WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _weight_axes(graph) -> dict[str, int]:
    """Initializers used as an op's weight -> the axis of its output channels."""
    inits = {init.name for init in graph.initializer}
    axes = {}
    for node in graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Conv":
            axes[node.input[1]] = 0  # (out, in, kh, kw)
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes[node.input[1]] = 0 if trans_b else 1
        else:
            axes[node.input[1]] = 1  # MatMul: (in, out)
    return axes


def store_weights_int8(graph) -> None:
    """Weights of Conv / MatMul / Gemm as int8 (symmetric, one scale per output channel) + DequantizeLinear to
    the weight's own type (float32, or float16 through com.microsoft's); the other float32 tensors of
    >= FP16_MIN_ELEMENTS as fp16 + Cast (`store_weights_fp16`)."""
    from onnx import TensorProto, helper, numpy_helper

    axes = _weight_axes(graph)
    nodes, scales = [], set()
    for init in graph.initializer:
        small = int(np.prod(init.dims)) < FP16_MIN_ELEMENTS
        if init.name not in axes or init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or small:
            continue
        name, axis, half = init.name, axes[init.name], init.data_type == TensorProto.FLOAT16
        values = numpy_helper.to_array(init).astype(np.float32)
        reduce = tuple(i for i in range(values.ndim) if i != axis)
        scale = (np.abs(values).max(axis=reduce) / 127.0).astype(np.float16 if half else np.float32)
        scale[scale == 0] = 1.0
        shape = [1] * values.ndim
        shape[axis] = -1
        q = np.clip(np.round(values / scale.astype(np.float32).reshape(shape)), -127, 127).astype(np.int8)
        init.CopyFrom(numpy_helper.from_array(q, f"{name}.int8"))
        graph.initializer.append(numpy_helper.from_array(scale, f"{name}.scale"))
        scales.add(f"{name}.scale")
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale"], [name],
                                      name=f"{name}.dequantize", axis=axis, domain=MS_DOMAIN if half else ""))
    prepend_nodes(graph, nodes)
    store_weights_fp16(graph, keep=frozenset(scales))  # float32 scales stay so, as opset 17 wants them


def write_int8_weights(src: Path, dst: Path) -> None:
    model = _load(src)
    store_weights_int8(model.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_graph(model, dst)


def fold_initializer_casts(graph) -> None:
    """A Cast whose input is an initializer read by it alone (fp16 storage: `store_weights_fp16`) becomes the
    initializer it gives, so weight ops read initializers again."""
    from collections import Counter

    from onnx import helper, numpy_helper

    inits = {init.name: init for init in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}
    folded, kept = [], []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Cast" else None
        if source in inits and readers[source] == 1 and node.output[0] not in outputs:
            to = helper.tensor_dtype_to_np_dtype(next(a.i for a in node.attribute if a.name == "to"))
            folded.append(numpy_helper.from_array(numpy_helper.to_array(inits.pop(source)).astype(to), node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend([*inits.values(), *folded])


def write_int8_weights_fp16_compute(src: Path, dst: Path) -> None:
    model = fp16_compute_graph(src)
    fold_initializer_casts(model.graph)  # a source stored as fp16 keeps its weights behind Casts
    store_weights_int8(model.graph)
    import_ms_domain(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_graph(model, dst)


def write_int4_weights(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(_load(src), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True)
    quantizer.process()
    model = quantizer.model.model
    store_weights_int8(model.graph)  # the convolutions (MatMulNBits weights are uint8 already)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_graph(model, dst)


def write_int8_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]],
                      keep_float: tuple[str, ...] = SENSITIVE_LAYERS) -> None:
    """Static W8A8 (QDQ) with activation ranges (min / max) over `calibration`, a list of graph feeds; weight
    ops whose node name holds one of `keep_float` are left in float."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(calibration)

        def get_next(self):
            return next(self._feeds, None)

    graph = onnx.load(str(src), load_external_data=False).graph
    inits = {init.name for init in graph.initializer}
    with tempfile.TemporaryDirectory(dir=dst.parent.parent) as work:
        if any(n.op_type == "Cast" and n.input[0] in inits for n in graph.node):
            # weights stored as fp16 behind Casts (a fp16 source): float32 initializers again, or no weight
            # op would be found to quantize
            model = _load(src)
            fold_initializer_casts(model.graph)
            src = Path(work) / "source" / "model.onnx"
            src.parent.mkdir()
            save_graph(model, src)
            graph = model.graph
        weights = _weight_axes(graph)
        names = [n.name for n in graph.node if n.op_type in _WEIGHT_OPS and len(n.input) > 1
                 and n.input[1] in weights and not any(layer in n.name for layer in keep_float)]
        tmp = Path(work) / "model.onnx"
        # reduce_range: 7-bit weights. ONNX Runtime's u8 x s8 kernels on CPUs without VNNI (AVX2 laptops) add
        # pairs of products in int16 and saturate; with full-range weights the embedded model's int8 VAE decoder
        # fell from 38-43 dB (the graph's QDQ arithmetic) to 23-35 dB there, with 7-bit weights 37-42 dB either way
        quantize_static(str(src), str(tmp), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=names,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True, reduce_range=True,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_graph(_load(tmp), dst)
