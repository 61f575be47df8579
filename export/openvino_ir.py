"""Recipes for OpenVINO IR: the fp32 ONNX graph the exporter traced -> `openvino_model.xml` + `.bin`.

`openvino.convert_model` reads the ONNX graph; NNCF does the integer recipes:

- fp32: converted as it is. fp16: `save_model(compress_to_fp16=True)`, weights stored in half precision
  and decompressed to fp32 when compiled (the same as the ONNX fp16 recipe: computed in fp32).
- int8-weights: `nncf.compress_weights` INT8_ASYM (per output channel) on every MatMul / Gather / Convolution.
- int4-weights: MatMul weights 4-bit symmetric in groups of INT4_GROUP_SIZE (NNCF keeps the first and
  last weighted layers and embeddings in int8, its `backup_mode`).
- int8: `nncf.quantize`, static W8A8 of the U-Net with activation statistics from the calibration inputs
  (transformer model type: attention matmuls are quantized too); the U-Net's layers in quantize.KEEP_FLOAT stay
  fp32.
- int8-hybrid (OpenVINO only): the MatMul / Gemm weights int8 weight-only, the convolutions static W8A8.
  Attention and projection layers keep fp32 activations, which suits models with outlier activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgesd.errors import EdgesdError
from edgesd.model import IR_FILE

from .quantize import KEEP_FLOAT

INT4_GROUP_SIZE = 32


def _ignored_sensitive():
    import nncf

    # convert_model keeps the ONNX node names (/conv_in/Conv, /time_embedding/linear_1/Gemm, ...).
    return nncf.IgnoredScope(patterns=[f".*/{layer}/.*" for layer in KEEP_FLOAT["unet"]], validate=False)


def _weighted_matmuls(model) -> list[str]:
    """Names of MatMul ops whose second input is a constant (possibly behind Convert): layers with weights."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        source = op.input_value(1).get_node()
        while source.get_type_name() in ("Convert", "Transpose"):
            source = source.input_value(0).get_node()
        if source.get_type_name() == "Constant":
            names.append(op.get_friendly_name())
    return names


def write_ir_recipe(src: Path, dst_dir: Path, recipe: str, calibration: list[dict[str, np.ndarray]] | None = None
                    ) -> Path:
    """Convert the fp32 ONNX graph `src` to IR in `recipe`, written as `dst_dir/openvino_model.xml`."""
    import openvino as ov

    model = ov.convert_model(str(src))
    if recipe in ("int8-weights", "int4-weights", "int8", "int8-hybrid"):
        import nncf  # noqa: F401 (fails early, with the recipe's name in the error below)

        model = _nncf_recipe(model, recipe, calibration)
    elif recipe not in ("fp32", "fp16"):
        raise EdgesdError(f"unknown recipe '{recipe}' for OpenVINO IR", "see `edgesd export --help`")
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / IR_FILE
    ov.save_model(model, str(dst), compress_to_fp16=recipe == "fp16")
    return dst


def _nncf_recipe(model, recipe: str, calibration: list[dict[str, np.ndarray]] | None):
    import nncf

    if recipe == "int8-weights":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if recipe == "int4-weights":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=INT4_GROUP_SIZE,
                                     ratio=1.0)
    if not calibration:
        raise EdgesdError(f"the {recipe} recipe needs calibration inputs", "give at least one calibration prompt")
    dataset = nncf.Dataset(calibration)
    # 7-bit weights in every layer (NNCF's overflow fix; its default does the first layer only): int8 kernels on
    # CPUs without VNNI (AVX2) add pairs of u8 x s8 products in int16 and saturate with full-range weights
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE)
    if recipe == "int8":
        return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                             ignored_scope=_ignored_sensitive(), advanced_parameters=advanced)
    # int8-hybrid: weight-only int8 for the weighted MatMuls first, then static quantization of the rest.
    matmuls = _weighted_matmuls(model)
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                  ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    ignored = nncf.IgnoredScope(names=matmuls, patterns=_ignored_sensitive().patterns, validate=False)
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                         ignored_scope=ignored, advanced_parameters=advanced)
