"""LoRA against diffusers' load_lora_weights + fuse_lora(lora_scale=...): kohya / A1111 files (LoRA and LoCon,
SDXL's SGM names, both text encoders) and diffusers / PEFT files, merged at export or added at load on both
backends (fp32 and fp16 graphs); bad LoRAs get one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgesd
from edgesd.errors import EdgesdError
from edgesd.export.parity import psnr

from .commands import edgesd as run_edgesd
from .lora_files import write_kohya_lora, write_peft_lora

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT = "a red circle on a blue square"
MIN_PSNR_DB = 40.0
SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (diffusers folder, fp32 export, fp16 export, fp16 IR export); SDXL's fp16 ONNX is left out
    (the SD model checks that recipe; CI time)."""
    from edgesd.export import ExportOptions, export_model
    from edgesd.export.tiny import build_random_family, build_random_sd

    root = tmp_path_factory.mktemp("lora")
    out = {}
    for kind in ("sd", "sdxl"):
        src = build_random_sd(root / kind, seed=21) if kind == "sd" else \
            build_random_family(root / kind, "sdxl", seed=22, second_encoder_width=48)
        exports = [root / f"{kind}-{name}" for name in ("fp32", "fp16", "ir-fp16")]
        export_model(src, exports[0])
        if kind == "sd":
            export_model(src, exports[1], ExportOptions(recipe="fp16"))
        export_model(src, exports[2], ExportOptions(recipe="fp16", format="openvino"))
        out[kind] = (src, *exports)
    return out


def _pipeline(kind: str, src: Path):
    if kind == "sd":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None)
    else:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(kind: str, fmt: str, models, folder: Path) -> Path:
    pipe = _pipeline(kind, models[kind][0])
    if fmt == "peft":
        return write_peft_lora(folder, pipe)
    encoders = {"lora_te": pipe.text_encoder} if kind == "sd" else \
        {"lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2}
    return write_kohya_lora(folder / "kohya.safetensors", pipe.unet, encoders, sgm_names=kind == "sdxl",
                            unet_config=dict(pipe.unet.config))


def _latents(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)


ARGS = dict(num_inference_steps=4, height=SIZE, width=SIZE, guidance_scale=5.0)


def _diffusers_image(kind, src, loras: list[tuple[Path, float]]) -> np.ndarray:
    pipe = _pipeline(kind, src)
    if len(loras) == 1:
        pipe.load_lora_weights(str(loras[0][0]))
        pipe.fuse_lora(lora_scale=loras[0][1])
    elif loras:  # several: each adapter weighted, then fused together
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe(PROMPT, latents=torch.from_numpy(_latents()), output_type="np", **ARGS).images[0] * 255


def _ours(pipe) -> np.ndarray:
    return np.asarray(pipe(PROMPT, latents=_latents(), **ARGS).images[0], np.float64)


_PLAIN: dict[str, np.ndarray] = {}  # diffusers' picture without a LoRA, per kind (the same for both formats)


@pytest.mark.parametrize("kind, fmt", [("sd", "kohya"), ("sd", "peft"), ("sdxl", "kohya"), ("sdxl", "peft")])
def test_lora_at_load_equals_diffusers_fuse_lora(models, kind, fmt, tmp_path):
    src, fp32, fp16, ir16 = models[kind]
    path = _lora(kind, fmt, models, tmp_path)
    expected = _diffusers_image(kind, src, [(path, 0.8)])
    if kind not in _PLAIN:
        _PLAIN[kind] = _diffusers_image(kind, src, [])
    assert psnr(expected, _PLAIN[kind]) < 35  # the LoRA changes the picture
    for folder, backend in ((fp32, "onnxruntime"), (fp32, "openvino"), (fp16, "onnxruntime"), (ir16, "openvino")):
        if not folder.exists():
            continue
        got = _ours(edgesd.Pipeline.load(folder, loras=[(path, 0.8)], backend=backend))
        assert psnr(expected, got) >= MIN_PSNR_DB, (folder.name, backend)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_merged_at_export_equals_diffusers(models, kind, tmp_path):
    from edgesd.export import ExportOptions, export_model
    from edgesd.lora import LoraSpec

    src = models[kind][0]
    path = _lora(kind, "kohya", models, tmp_path)
    expected = _diffusers_image(kind, src, [(path, 0.6)])
    export_model(src, tmp_path / "merged", ExportOptions(loras=(LoraSpec(path, 0.6),)))
    assert psnr(expected, _ours(edgesd.Pipeline.load(tmp_path / "merged"))) >= MIN_PSNR_DB
    if kind == "sd":  # any recipe: the LoRA is in the weights before quantizing
        merged_int8 = tmp_path / "merged-int8"
        export_model(src, merged_int8, ExportOptions(loras=(LoraSpec(path, 0.6),), recipe="int8-weights"))
        assert edgesd.Pipeline.load(merged_int8).folder.manifest["source"]["loras"][0]["scale"] == 0.6


def test_two_loras_add_and_switching_reloads_only_what_they_change(models, tmp_path):
    src, fp32 = models["sd"][0], models["sd"][1]
    kohya = _lora("sd", "kohya", models, tmp_path)
    peft = _lora("sd", "peft", models, tmp_path)
    expected = _diffusers_image("sd", src, [(kohya, 0.5), (peft, 0.7)])
    both = edgesd.Pipeline.load(fp32, loras=[(kohya, 0.5), f"{peft}:0.7"])
    assert psnr(expected, _ours(both)) >= MIN_PSNR_DB
    assert both(PROMPT, **ARGS, seed=1).parameters["loras"] == ["kohya.safetensors:0.5", "lora.safetensors:0.7"]
    plain = edgesd.Pipeline.load(fp32)
    back = both.with_loras([])
    assert np.array_equal(_ours(back), _ours(plain))
    assert back.graphs["vae_decoder"] is both.graphs["vae_decoder"]  # unchanged graphs are kept
    switched = plain.with_loras([(kohya, 0.5), (peft, 0.7)])
    assert np.array_equal(_ours(switched), _ours(both))
    zero = edgesd.Pipeline.load(fp32, loras=[(kohya, 0.0)])
    np.testing.assert_allclose(_ours(zero), _ours(plain), atol=1)


def _write(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("make, needle", [
    (lambda t, m: _write(t / "x.safetensors", {"lora_unet_mid_block_attentions_9_proj_in.lora_down.weight":
                                               torch.zeros(2, 32), "lora_unet_mid_block_attentions_9_proj_in."
                                               "lora_up.weight": torch.zeros(32, 2)}),
     "lora_unet_mid_block_attentions_9_proj_in.lora_down.weight matches no layer"),
    (lambda t, m: _lora("sdxl", "kohya", m, t), "looks made for SDXL"),
    (lambda t, m: _write(t / "w.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 1024),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 2)}),
     "looks made for SD 2.x"),
    (lambda t, m: _write(t / "h.safetensors", {"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}), "is LoHa"),
    (lambda t, m: _write(t / "k.safetensors", {"model.diffusion_model.x": torch.zeros(2)}), "not a LoRA weight"),
    (lambda t, m: (t / "l.pt").write_bytes(b"x") and t / "l.pt", "never unpickles"),
    (lambda t, m: t / "missing.safetensors", "does not exist"),
])
def test_bad_loras_are_named(models, tmp_path, make, needle):
    with pytest.raises(EdgesdError) as e:
        edgesd.Pipeline.load(models["sd"][1], loras=[(make(tmp_path, models), 1.0)])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("recipe", ["int8-weights", "int8-weights-fp16-compute"])
def test_quantized_graphs_refuse_a_load_time_lora(models, tmp_path, recipe):
    from edgesd.export import ExportOptions, export_model

    export_model(models["sd"][0], tmp_path / "int8", ExportOptions(recipe=recipe, with_vae_encoder=False))
    path = _lora("sd", "kohya", models, tmp_path)
    with pytest.raises(EdgesdError, match=f"{recipe} graph holds quantized weights.*export the model with --lora"):
        edgesd.Pipeline.load(tmp_path / "int8", loras=[(path, 1.0)])


def test_lora_on_the_command_line(models, tmp_path):
    path = _lora("sd", "kohya", models, tmp_path)
    run = run_edgesd("generate", PROMPT, "--model", models["sd"][1], "--lora", f"{path}:0.8", "--steps", 2, "--seed", 4,
                 "-o", tmp_path / "a.png")
    assert run.returncode == 0, run.stderr
    run = run_edgesd("generate", PROMPT, "--model", models["sd"][1], "--lora", tmp_path / "none.safetensors",
                 "-o", tmp_path / "b.png")
    assert run.returncode == 2 and run.stderr.count("error:") == 1 and "does not exist" in run.stderr
    run = run_edgesd("export", models["sd"][0], tmp_path / "o", "--lora", tmp_path / "none.safetensors")
    assert run.returncode == 2 and "does not exist" in run.stderr and not (tmp_path / "o").exists()


def test_weights_outside_the_graph_folder_are_never_read(tmp_path):
    """A hostile graph whose external data points out of its folder (or through a symlink): refused."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgesd.tensor_files import onnx_initializers

    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    folder = tmp_path / "model" / "unet"
    folder.mkdir(parents=True)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    for location in ("../../secret.bin", str(tmp_path / "secret.bin"), "link.bin"):
        weight = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "64")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [weight])
        onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"))
        with pytest.raises(EdgesdError, match="point outside its folder"):
            onnx_initializers(folder / "model.onnx")


def test_graphs_reading_outside_their_folder_are_refused_before_any_backend(tiny_onnx, tmp_path):
    """The same hostile locations, and a symlinked model.onnx, through Pipeline.load on both backends."""
    import shutil

    import onnx

    (tmp_path / "secret.bin").write_bytes(b"\0" * (1 << 16))
    for case in ("climb", "absolute", "symlink-graph"):
        model = tmp_path / case
        shutil.copytree(tiny_onnx, model)
        graph = model / "vae_decoder" / "model.onnx"
        if case == "symlink-graph":
            shutil.move(graph, tmp_path / "elsewhere.onnx")
            graph.symlink_to(tmp_path / "elsewhere.onnx")
            needle = "symbolic link"
        else:
            proto = onnx.load(str(graph))
            init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            location = "../../secret.bin" if case == "climb" else str(tmp_path / "secret.bin")
            for key, value in (("location", location), ("offset", "0")):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            onnx.save_model(proto, str(graph))
            needle = "point outside its folder"
        for backend in ("onnxruntime", "openvino"):
            with pytest.raises(EdgesdError, match=needle):
                edgesd.Pipeline.load(model, backend=backend)
