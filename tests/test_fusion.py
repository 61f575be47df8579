"""Attention fusion (export/fusion.py): torch's exported attention as one MultiHeadAttention node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgesd.export.fusion import fuse_attention
from edgesd.models_path import default_model_path


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.fixture(scope="module")
def unet():
    return onnx.load(str(default_model_path() / "unet" / "model.onnx"))


def _feeds(batch=2, side=32, tokens=77):
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((batch, 4, side, side)).astype(np.float32),
            "timestep": np.array([500.0] * batch, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, tokens, 128)).astype(np.float32)}


@pytest.mark.parametrize("shape", [dict(), dict(batch=1, side=16, tokens=154)])
def test_every_unet_attention_is_fused_and_the_output_unchanged(unet, shape):
    fused = onnx.ModelProto()
    fused.CopyFrom(unet)
    softmaxes = sum(n.op_type == "Softmax" for n in unet.graph.node)
    assert fuse_attention(fused) == softmaxes == 14  # 7 transformer blocks: self- and cross-attention
    onnx.checker.check_model(fused)
    assert not any(n.op_type in ("Softmax", "Sqrt") for n in fused.graph.node)  # the scale arithmetic is gone
    assert len(fused.graph.node) < 0.7 * len(unet.graph.node)
    heads = {onnx.helper.get_attribute_value(a) for n in fused.graph.node if n.op_type == "MultiHeadAttention"
             for a in n.attribute if a.name == "num_heads"}
    config_heads = 8  # models/edgesd-tiny/unet/config.json: attention_head_dim
    assert heads == {config_heads}
    want, got = _run(unet, _feeds(**shape)), _run(fused, _feeds(**shape))
    assert np.abs(want - got).max() < 1e-4 * np.abs(want).max()


def test_a_pattern_that_differs_is_left_alone(unet):
    """An attention whose scale is a constant (not the default 1/sqrt(D)) keeps its nodes."""
    changed = onnx.ModelProto()
    changed.CopyFrom(unet)
    first = next(n for n in changed.graph.node if n.op_type == "Softmax")
    scores = next(n for n in changed.graph.node if first.input[0] in n.output)
    q_mul = next(n for n in changed.graph.node if scores.input[0] in n.output)
    changed.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "custom_scale"))
    q_mul.input[1] = "custom_scale"
    want = _run(changed, _feeds())
    assert fuse_attention(changed) == 13
    assert sum(n.op_type == "Softmax" for n in changed.graph.node) == 1
    got = _run(changed, _feeds())
    assert np.abs(want - got).max() < 1e-4 * np.abs(want).max()


def test_the_text_encoders_masked_attention_is_not_fused():
    """CLIP's causal mask is added between the scores and the softmax: not the pattern, nothing changes."""
    encoder = onnx.load(str(default_model_path() / "text_encoder" / "model.onnx"))
    before = len(encoder.graph.node)
    assert fuse_attention(encoder) == 0 and len(encoder.graph.node) == before
