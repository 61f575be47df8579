"""Precision recipes: fp16 weight storage, the lossless embedding dedupe, the model's own defaults."""

import json
import shutil

import numpy as np
import onnx
import pytest

import edgesd
from edgesd.errors import EdgesdError


def _graph_bytes(folder, component):
    return sum(p.stat().st_size for p in (folder / component).glob("model.onnx*"))


@pytest.fixture(scope="module")
def tiny_fp16(tiny_src, tmp_path_factory):
    from edgesd.export import ExportOptions, export_model
    from edgesd.model import GenerationDefaults

    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    report = export_model(tiny_src, out, ExportOptions(recipe="fp16", with_vae_encoder=False,
                                                       defaults=GenerationDefaults(12, 3.0)))
    assert report.passed
    return out


def test_fp16_halves_the_weights_and_computes_in_fp32(tiny_onnx, tiny_fp16):
    for component in ("unet", "vae_decoder"):
        ratio = _graph_bytes(tiny_fp16, component) / _graph_bytes(tiny_onnx, component)
        assert 0.45 < ratio < 0.65, (component, ratio)
        graph = onnx.load(str(tiny_fp16 / component / "model.onnx")).graph
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input)
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in graph.output)
        # every fp16 weight is cast straight back to fp32: no op computes in fp16
        fp16 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
        assert fp16
        for node in graph.node:
            if set(node.input) & fp16:
                assert node.op_type == "Cast", node.op_type
    manifest = json.loads((tiny_fp16 / "edgesd.json").read_text())
    assert {g["precision"] for g in manifest["graphs"].values()} == {"fp16"}


def test_fp16_images_match_fp32(tiny_onnx, tiny_fp16):
    from edgesd.export.parity import psnr

    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, seed=5)
    a = edgesd.Pipeline.load(tiny_onnx)("a red circle", **kwargs)
    b = edgesd.Pipeline.load(tiny_fp16)("a red circle", **kwargs)
    assert psnr(np.asarray(a.images[0], np.float64), np.asarray(b.images[0], np.float64)) > 35


def test_model_defaults_are_used_unless_overridden(tiny_onnx, tiny_fp16):
    pipe = edgesd.Pipeline.load(tiny_fp16)
    assert (pipe.defaults.num_inference_steps, pipe.defaults.guidance_scale) == (12, 3.0)
    result = pipe("a red circle", seed=1)
    assert result.parameters["steps"] == 12 and result.parameters["guidance_scale"] == 3.0
    result = pipe("a red circle", seed=1, num_inference_steps=2, guidance_scale=1.0)
    assert result.parameters["steps"] == 2 and result.parameters["guidance_scale"] == 1.0
    plain = edgesd.Pipeline.load(tiny_onnx).defaults  # no defaults in its manifest: SD's
    assert (plain.num_inference_steps, plain.guidance_scale) == (20, 7.5)


def test_repeated_embedding_rows_are_stored_once(tiny_src, tiny_onnx, tmp_path):
    """The embedded model ties unseen tokens to one row; the export stores distinct rows only, losslessly."""
    from safetensors.torch import load_file, save_file

    from edgesd.export import export_model

    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    path = src / "text_encoder" / "model.safetensors"
    state = load_file(path)
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    table = state[key]
    table[100:] = table[99]  # all but 100 rows identical
    save_file(state, path)
    out = tmp_path / "out"
    report = export_model(src, out, edgesd.export.ExportOptions(with_vae_encoder=False))
    text = [r for r in report.parity if r.component == "text_encoder"]
    assert all(r.max_abs_error < 1e-4 for r in text)
    assert _graph_bytes(out, "text_encoder") < 0.5 * _graph_bytes(tiny_onnx, "text_encoder")
    ids = np.array([[49406, 320, 5000, 40000, 49407] + [49407] * 72])
    got = edgesd.Pipeline.load(out).graphs["text_encoder"].run({"input_ids": ids})["last_hidden_state"]
    assert np.isfinite(got).all()


def test_unknown_recipe_is_a_clear_error(tiny_src, tmp_path):
    from edgesd.export import ExportOptions

    with pytest.raises(EdgesdError, match="unknown recipe 'int3'.*fp32, fp16"):
        ExportOptions(recipe="int3")


@pytest.mark.parametrize("recipe", ["fp32", "fp16"])
def test_graphs_with_external_weights(tiny_src, tmp_path, monkeypatch, recipe):
    """As SD 1.5's U-Net (over 1 GB): weights in model.onnx_data, and each recipe keeps them readable."""
    from edgesd.export import ExportOptions, components, export_model

    monkeypatch.setattr(components, "EXTERNAL_DATA_THRESHOLD", 0)  # every graph "large"
    out = tmp_path / "out"
    report = export_model(tiny_src, out, ExportOptions(recipe=recipe, with_vae_encoder=False))
    assert report.passed
    assert (out / "unet" / components.EXTERNAL_DATA_FILE).is_file()
    assert edgesd.Pipeline.load(out)("a red circle", num_inference_steps=2, seed=1).images[0].size == (32, 32)
