"""Single-file checkpoints (LDM / SGM layout): tiny models written by the tests' own writer load to the weights of
their diffusers folders, diffusers' `from_single_file` reads the same files to the same weights (so the files
are the real layout), the export equals the folder's, and bad files get one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesd.errors import EdgesdError

from .commands import edgesd
from .ldm_writer import ldm_state, write_single_file

PIPELINES = {"sd": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline",
             "sdxl": "StableDiffusionXLPipeline", "sdxl-inpaint": "StableDiffusionXLInpaintPipeline"}
DTYPES = {"sd": torch.float16, "sd2": torch.bfloat16, "inpaint": torch.float32, "sdxl": torch.float32,
          "sdxl-inpaint": torch.float16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from edgesd.export.tiny import build_random_family, build_random_sd

    root = tmp_path_factory.mktemp("single-file")
    out = {"sd": build_random_sd(root / "sd", seed=3)}
    for kind in ("sd2", "inpaint"):
        out[kind] = build_random_family(root / kind, kind, seed=4)
    for kind in ("sdxl", "sdxl-inpaint"):  # a wider second encoder, as in real SDXL (diffusers tells them apart so)
        out[kind] = build_random_family(root / kind, kind, seed=5, second_encoder_width=48)
    return out


def _components(family) -> tuple[str, ...]:
    return ("unet", "vae_decoder", *family.text_components)


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_single_file_loads_to_the_folder_weights_as_diffusers_reads_it(folders, kind, tmp_path):
    import diffusers

    from edgesd.export.loading import load_source
    from edgesd.export.single_file import load_single_file

    folder = folders[kind]
    path = write_single_file(folder, tmp_path / "model.safetensors", DTYPES[kind])
    ours, reference = load_single_file(path, config_dir=folder), load_source(folder)
    assert ours.family.name == reference.family.name
    pipe = getattr(diffusers, PIPELINES[kind]).from_single_file(str(path), config=str(folder), local_files_only=True,
                                                                torch_dtype=torch.float32)
    tolerance = {torch.float32: 0, torch.float16: 2e-3, torch.bfloat16: 2e-2}[DTYPES[kind]]
    for component in _components(ours.family):
        got = ours.load(component).state_dict()
        folder_state = reference.load(component).state_dict()
        theirs = getattr(pipe, "vae" if component == "vae_decoder" else component).state_dict()
        assert set(got) == set(folder_state)
        for key, value in got.items():
            assert torch.equal(value, theirs[key].float()), (component, key)  # the same file, read the same
            assert torch.allclose(value, folder_state[key], atol=tolerance * (1 + folder_state[key].abs().max())), key


def test_single_file_export_equals_the_folder_export(folders, tmp_path):
    from edgesd import Pipeline
    from edgesd.export import export_model, ExportOptions

    path = write_single_file(folders["sd"], tmp_path / "model.safetensors")
    from_file = export_model(path, tmp_path / "from-file", ExportOptions(config=folders["sd"]))
    from_folder = export_model(folders["sd"], tmp_path / "from-folder")
    assert from_file.passed and from_folder.passed
    manifest = json.loads((tmp_path / "from-file" / "edgesd.json").read_text())
    assert manifest["source"]["path"] == str(path.resolve())
    images = [Pipeline.load(tmp_path / name)("a red square", num_inference_steps=3, seed=2).images[0]
              for name in ("from-file", "from-folder")]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def _real_shapes(config_name: str, inpaint: bool) -> dict[str, tuple]:
    """The tensor shapes of a real architecture's single file (weights on the meta device: no memory)."""
    from edgesd.export.single_file import CONFIGS, _expected_shapes

    root = CONFIGS / config_name
    configs = {c: json.loads((root / c / "config.json").read_text())
               for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (root / c).is_dir()}
    configs["unet"]["in_channels"] = 9 if inpaint else 4
    states = {c: {k: torch.empty(s, device="meta" if "text_projection" not in k else "cpu")
                  for k, s in _expected_shapes(c, cfg, c == "text_encoder_2").items()} for c, cfg in configs.items()}
    return {k: tuple(v.shape) for k, v in ldm_state(states, configs).items()}


@pytest.mark.parametrize("config_name, inpaint, family, layout", [
    ("sd15", False, "sd", "sd1"), ("sd15-inpainting", True, "sd-inpaint", "sd1"), ("sd21-v", False, "sd", "sd2"),
    ("sdxl-base", False, "sdxl", "sdxl"), ("sdxl-base", True, "sdxl-inpaint", "sdxl")])
def test_real_architectures_are_detected_and_every_tensor_mapped(config_name, inpaint, family, layout):
    from edgesd.export.single_file import SingleFileWeights, _shipped_configs, check_coverage, detect_layout
    from edgesd.families import detect_family

    shapes = _real_shapes(config_name, inpaint)
    found, is_inpaint = detect_layout(shapes, config_name)
    assert (found.name, is_inpaint) == (layout, inpaint)
    configs, _ = _shipped_configs(found, is_inpaint, None)
    assert detect_family(configs["model_index"], configs["unet"], "x").name == family
    check_coverage(SingleFileWeights(Path("m.safetensors"), found, configs, frozenset(shapes)),
                   detect_family(configs["model_index"], configs["unet"], "x"), shapes)


def test_sd2_prediction_type_is_assumed_and_said_or_given():
    from edgesd.export.single_file import LAYOUTS, _shipped_configs

    configs, notes = _shipped_configs(LAYOUTS["sd2"], False, None)
    assert configs["scheduler"]["prediction_type"] == "epsilon" and configs["unet"]["sample_size"] == 64
    assert "--prediction-type v_prediction" in notes[0]
    configs, notes = _shipped_configs(LAYOUTS["sd2"], False, "v_prediction")
    assert configs["scheduler"]["prediction_type"] == "v_prediction" and configs["unet"]["sample_size"] == 96
    assert notes == []


def test_a1111_yaml_beside_the_file_names_v_prediction(tmp_path):
    from edgesd.export.single_file import yaml_prediction_type

    model = tmp_path / "sd21-768.safetensors"
    assert yaml_prediction_type(model) is None
    (tmp_path / "sd21-768.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    assert yaml_prediction_type(model) == "v_prediction"
    (tmp_path / "sd21-768.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")  # LDM's default: eps
    assert yaml_prediction_type(model) is None


def test_replacement_vae_from_a_file_or_a_folder(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    from edgesd.export.loading import load_source
    from edgesd.export.single_file import load_single_file, vae_override
    from edgesd.export.tiny import build_random_sd

    other = build_random_sd(tmp_path / "other", seed=11)  # same architecture, other weights
    wanted = load_source(other).load("vae_decoder").state_dict()
    vae_state = load_file(next((other / "vae").glob("*.safetensors")))
    ldm = {k.removeprefix("first_stage_model."): v for k, v in ldm_state(
        {"unet": {}, "vae": vae_state, "text_encoder": {}},
        {"unet": {"layers_per_block": 1, "up_block_types": []}, "vae": json.loads((other / "vae" / "config.json").read_text()),
         "text_encoder": {"hidden_act": "quick_gelu"}}).items() if k.startswith("first_stage_model.")}
    save_file(ldm, str(tmp_path / "vae-ldm.safetensors"))
    save_file(vae_state, str(tmp_path / "vae-diffusers.safetensors"))
    model = load_single_file(write_single_file(folders["sd"], tmp_path / "m.safetensors"), config_dir=folders["sd"])
    for vae in (tmp_path / "vae-ldm.safetensors", tmp_path / "vae-diffusers.safetensors", other / "vae", other):
        model.vae, model.configs["vae"] = vae_override(vae, model.configs["vae"])
        got = model.load("vae_decoder").state_dict()
        assert all(torch.equal(got[k], wanted[k]) for k in wanted), vae


def _bad(tmp_path, folders, **kw) -> Path:
    return write_single_file(folders["sd"], tmp_path / "bad.safetensors", **kw)


@pytest.mark.parametrize("make, needle", [
    (lambda t, f: _bad(t, f, extra={"model.diffusion_model.extra_head.weight": torch.zeros(2)}),
     "does not map: model.diffusion_model.extra_head.weight"),
    (lambda t, f: _bad(t, f, drop=("model.diffusion_model.out.2.weight",)), "lacks model.diffusion_model.out.2.weight"),
    (lambda t, f: _bad(t, f, extra={"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 1, 1)}),
     "model.diffusion_model.out.2.weight has shape (4, 32, 1, 1)"),
    (lambda t, f: _write(t / "m.ckpt", b"\x80\x04pickle"), "pickle file"),
    (lambda t, f: _write(t / "m.safetensors", b"\x10\x00\x00"), "cannot read"),
    (lambda t, f: _lora_like(t), "is a LoRA file"),
])
def test_bad_single_files_are_named(folders, tmp_path, make, needle):
    from edgesd.export.single_file import load_single_file

    with pytest.raises(EdgesdError) as e:
        load_single_file(make(tmp_path, folders), config_dir=folders["sd"])
    assert needle in str(e.value) and "\n" not in str(e.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _lora_like(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4)},
              str(tmp_path / "lora.safetensors"))
    return tmp_path / "lora.safetensors"


def test_source_options_that_do_not_fit_are_refused(folders, tmp_path):
    from edgesd.export import ExportOptions, export_model

    path = write_single_file(folders["sd"], tmp_path / "m.safetensors")
    for src, options, needle in ((folders["sd"], ExportOptions(prediction_type="epsilon"), "single-file"),
                                 (path, ExportOptions(vae=tmp_path / "none.safetensors"), "does not exist")):
        with pytest.raises(EdgesdError, match=needle):
            export_model(src, tmp_path / "out", options)
        assert not (tmp_path / "out").exists()


def test_a_config_of_another_family_is_refused(folders, tmp_path):
    from edgesd.export.single_file import load_single_file

    path = write_single_file(folders["sdxl"], tmp_path / "xl.safetensors")
    with pytest.raises(EdgesdError, match="SDXL checkpoint but the config is SD"):
        load_single_file(path, config_dir=folders["sd"])


def test_cli_single_file_errors_are_one_line(folders, tmp_path):
    path = write_single_file(folders["sd"], tmp_path / "m.safetensors")
    shutil.copy(path, tmp_path / "m.ckpt")
    cases = [
        (["export", str(tmp_path / "m.ckpt"), str(tmp_path / "o1")], "never unpickles"),
        (["export", str(path), str(tmp_path / "o3"), "--vae", "fp16"], "--vae-recipe fp16"),
    ]
    for args, needle in cases:
        run = edgesd(*args)
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], run.stderr
        assert not (tmp_path / args[2]).exists()
