"""The exporter: layout, manifest, strict weight loading, parity report, nothing half-written."""

import json
import shutil

import numpy as np
import pytest

import edgesd
from edgesd.errors import EdgesdError
from edgesd.graphs import GRAPHS

from .conftest import FIXTURES

pytest.importorskip("torch")


def test_layout_and_manifest(tiny_onnx):
    for component in GRAPHS:
        assert (tiny_onnx / component / "model.onnx").is_file()
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "parity.json"):
        assert (tiny_onnx / name).is_file(), name
    manifest = json.loads((tiny_onnx / "edgesd.json").read_text())
    assert manifest["constants"] == {
        "latent_channels": 4, "vae_scale_factor": 2, "vae_scaling_factor": 0.18215, "sample_size": 16,
        "text_max_length": 77, "text_hidden_size": 32, "prediction_type": "epsilon", "latent_size_multiple": 2,
    }
    assert len(manifest["source"]["sha256"]) == 64
    unet = manifest["graphs"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["inputs"][0]["dims"] == ["batch", "channels", "height", "width"]
    parity = json.loads((tiny_onnx / "parity.json").read_text())
    assert all(r["passed"] and r["psnr_db"] >= 35 for r in parity.values())


def test_graphs_stay_dynamic(tiny_onnx):
    """Batch, height and width are free: run the U-Net at sizes it was not traced at."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx / "unet" / "model.onnx"))
    for batch, h, w in ((1, 8, 8), (3, 12, 20)):
        out = session.run(["out_sample"], {
            "sample": np.zeros((batch, 4, h, w), np.float32),
            "timestep": np.full((batch,), 10.0, np.float32),
            "encoder_hidden_states": np.zeros((batch, 77, 32), np.float32),
        })[0]
        assert out.shape == (batch, 4, h, w)


def test_transformers4_checkpoint_with_text_model_prefix_loads(tmp_path):
    """The committed fixture was saved by transformers 4.57 (`text_model.` keys); our export of it must
    give the same text features as optimum's export of it, i.e. no layer was left random."""
    from edgesd.export import export_model
    from edgesd.export.loading import _read_state_dict

    src = FIXTURES / "sd-micro-transformers4"
    assert all(k.startswith("text_model.") for k in _read_state_dict(src / "text_encoder"))
    out = tmp_path / "m4"
    export_model(src, out, edgesd.export.ExportOptions(with_vae_encoder=False))
    ours = edgesd.Pipeline.load(out).encode_prompts(["a blue square"])
    optimum = edgesd.Pipeline.load(FIXTURES / "optimum-onnx-micro").encode_prompts(["a blue square"])
    np.testing.assert_allclose(ours, optimum, atol=1e-4)


def _copy_src(tiny_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    return src


def _rewrite_text_weights(src, change):
    from safetensors.torch import load_file, save_file

    path = src / "text_encoder" / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("encoder.layers.1.mlp.fc1.weight"), "missing: encoder.layers.1.mlp.fc1.weight"),
    (lambda s: s.__setitem__("encoder.layers.9.extra", s["final_layer_norm.bias"].clone()), "unexpected"),
    (lambda s: s.__setitem__("final_layer_norm.bias", s["final_layer_norm.bias"][:5].clone()), "wrong shape"),
])
def test_bad_text_encoder_weights_are_named(tiny_src, tmp_path, change, message):
    from edgesd.export import export_model

    src = _copy_src(tiny_src, tmp_path)
    _rewrite_text_weights(src, change)
    with pytest.raises(EdgesdError, match=message):
        export_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_missing_unet_weight_is_named(tiny_src, tmp_path):
    from safetensors.torch import load_file, save_file

    from edgesd.export import export_model

    src = _copy_src(tiny_src, tmp_path)
    path = src / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("conv_in.weight")
    save_file(state, path)
    with pytest.raises(EdgesdError, match="unet: weights missing: conv_in.weight"):
        export_model(src, tmp_path / "out")


def test_failed_parity_leaves_nothing(tiny_src, tmp_path):
    from edgesd.export import ExportOptions, ExportParityError, export_model

    out = tmp_path / "out"
    with pytest.raises(ExportParityError) as info:
        export_model(tiny_src, out, ExportOptions(parity_threshold_db=1000.0, with_vae_encoder=False))
    assert info.value.report.parity and not info.value.report.passed
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_src, tmp_path):
    from edgesd.export import export_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgesdError, match="--overwrite"):
        export_model(tiny_src, out)
    assert (out / "keep.txt").read_text() == "mine"


class _NotATensor:
    pass


def test_a_pickle_weight_file_is_named_as_such(tiny_src, tmp_path):
    import shutil

    import torch

    from edgesd.errors import EdgesdError
    from edgesd.export import export_model

    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    for f in (src / "vae").glob("*.safetensors"):
        f.unlink()
    torch.save({"encoder.conv_in.weight": _NotATensor()}, src / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(EdgesdError, match="is a pickle that holds more than tensors"):
        export_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
