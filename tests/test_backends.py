"""Backends: OpenVINO (IR folders, ours and optimum-intel's; static shapes; compiled-model cache; devices),
ONNX Runtime options (providers, optimisation level, saved optimised graphs), and OpenVINO IR export."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgesd
from edgesd.backends import RuntimeOptions
from edgesd.cli import main
from edgesd.errors import EdgesdError

from .conftest import FIXTURES

OPTIMUM_IR = FIXTURES / "optimum-intel-micro"
OPTIMUM_ONNX = FIXTURES / "optimum-onnx-micro"
RUN = dict(num_inference_steps=3, width=32, height=32, seed=4, guidance_scale=5.0)


def test_optimum_intel_ir_folder_runs_like_its_onnx_twin():
    """The same micro model exported by optimum-cli to IR and to ONNX: the same latents on both backends."""
    ir = edgesd.Pipeline.load(OPTIMUM_IR)
    assert ir.options.backend == "openvino"  # "auto" chose it for an IR folder
    onnx = edgesd.Pipeline.load(OPTIMUM_ONNX)
    a, b = ir("a cat", **RUN), onnx("a cat", **RUN)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)
    assert a.parameters["backend"] == "openvino" and a.parameters["device"] == "CPU"
    assert "compile_s" in a.timings


def test_openvino_runs_onnx_files_with_the_same_result():
    ov = edgesd.Pipeline.load(OPTIMUM_ONNX, backend="openvino")
    ort = edgesd.Pipeline.load(OPTIMUM_ONNX, backend="onnxruntime")
    np.testing.assert_allclose(ov("a dog", **RUN).latents, ort("a dog", **RUN).latents, atol=1e-4)


def test_static_shapes_recompile_only_for_a_new_size():
    pipe = edgesd.Pipeline.load(OPTIMUM_IR)
    first = pipe("a cat", **RUN)
    again = pipe("a cat", **RUN)
    other = pipe("a cat", **{**RUN, "width": 48})
    assert first.timings["compile_s"] > 0 and "compile_s" not in again.timings and other.timings["compile_s"] > 0
    np.testing.assert_array_equal(first.latents, again.latents)
    dynamic = edgesd.Pipeline.load(OPTIMUM_IR, ov_shapes="dynamic")
    np.testing.assert_allclose(dynamic("a cat", **RUN).latents, first.latents, atol=1e-4)
    assert "compile_s" not in dynamic("a cat", **{**RUN, "width": 48}).timings  # compiled once, for any size


def test_openvino_cache_dir_holds_compiled_models(tmp_path):
    cache = tmp_path / "ov-cache"
    a = edgesd.Pipeline.load(OPTIMUM_IR, cache_dir=cache, ov_hint="throughput", threads=1)("a cat", **RUN)
    assert any(cache.glob("openvino-*/*.blob"))
    # each graph is compiled from a static-shape copy in the cache (OpenVINO then reads its blob alone)
    copies = sorted(cache.glob("openvino-*/static-*.xml"))
    assert len(copies) == 3 and all(c.with_suffix(".bin").is_file() for c in copies)
    assert not list(cache.glob("openvino-*/.partial-*"))
    b = edgesd.Pipeline.load(OPTIMUM_IR, cache_dir=cache)("a cat", **RUN)  # other options: another folder
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)
    copies = sorted(set(cache.glob("openvino-*/static-*.xml")) - set(copies))
    assert len(copies) == 3
    edgesd.Pipeline.load(OPTIMUM_IR, cache_dir=cache)("a cat", **RUN)
    assert len(list(cache.glob("openvino-*/static-*.xml"))) == 6  # found again, none added
    unet_copy = next(c for c in copies if "Parameter" in c.read_text() and "encoder_hidden_states" in c.read_text())
    unet_copy.write_text("cut short")  # a damaged copy is written again
    c = edgesd.Pipeline.load(OPTIMUM_IR, cache_dir=cache)("a cat", **RUN)
    np.testing.assert_allclose(a.latents, c.latents, atol=1e-5)
    assert unet_copy.stat().st_size > 100
    other_size = edgesd.Pipeline.load(OPTIMUM_IR, cache_dir=cache)("a cat", **{**RUN, "width": 48})
    assert other_size.images[0].size == (48, 32)
    assert len(list(cache.glob("openvino-*/static-*.xml"))) == 8  # a new size: the U-Net's and VAE's copies
    stale = _entry(cache, "openvino-" + "0" * 12 + "/42.blob", 10_000, 1)  # another device's, long unused
    edgesd.Pipeline.load(OPTIMUM_IR, cache_dir=cache, cache_max_gb=1e-9)("a cat", **RUN)
    assert not stale.exists() and any(cache.glob("openvino-*/*.blob"))  # compiling keeps the folder in bounds


def test_onnxruntime_cache_dir_saves_optimised_graphs(tmp_path):
    cache = tmp_path / "ort-cache"
    a = edgesd.Pipeline.load(OPTIMUM_ONNX, cache_dir=cache)("a cat", **RUN)
    saved = sorted(p.name for p in cache.iterdir())
    assert {n.split("-", 1)[0] for n in saved if n.endswith(".onnx")} == {"text_encoder", "unet", "vae_decoder"}
    assert not [n for n in saved if n.startswith(".partial")]
    b = edgesd.Pipeline.load(OPTIMUM_ONNX, cache_dir=cache)("a cat", **RUN)  # from the saved graphs
    assert sorted(p.name for p in cache.iterdir()) == saved
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)


def test_the_cache_is_on_by_default_and_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESD_CACHE_DIR", str(tmp_path / "default"))
    edgesd.Pipeline.load(OPTIMUM_ONNX)
    assert len(list((tmp_path / "default").glob("unet-*.onnx"))) == 1
    monkeypatch.setenv("EDGESD_CACHE_DIR", str(tmp_path / "off"))
    edgesd.Pipeline.load(OPTIMUM_ONNX, cache="off")
    assert not (tmp_path / "off").exists()
    monkeypatch.setenv("EDGESD_CACHE_DIR", "/proc/no-such-folder")  # a default that cannot be made: uncached
    edgesd.Pipeline.load(OPTIMUM_ONNX)
    with pytest.raises(EdgesdError, match="cannot write the cache folder .*--cache off"):
        edgesd.Pipeline.load(OPTIMUM_ONNX, cache_dir=Path("/proc/no-such-folder"))


def test_a_damaged_or_stale_cache_entry_is_made_again(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(OPTIMUM_ONNX, model)
    cache = tmp_path / "cache"
    first = edgesd.Pipeline.load(model, cache_dir=cache)("a cat", **RUN)
    (entry,) = cache.glob("unet-*.onnx")
    entry.write_bytes(b"cut short")  # a damaged copy: rebuilt, the pictures unchanged
    again = edgesd.Pipeline.load(model, cache_dir=cache)("a cat", **RUN)
    np.testing.assert_array_equal(first.latents, again.latents)
    assert entry.stat().st_size > 100
    (model / "unet" / "model.onnx").touch()  # the source changed: a new copy replaces the old one
    os.utime(model / "unet" / "model.onnx", ns=(1, 1))
    edgesd.Pipeline.load(model, cache_dir=cache)
    (newer,) = cache.glob("unet-*.onnx")
    assert newer.name != entry.name and not entry.exists()


def _entry(folder: Path, name: str, size: int, used: float) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (used, used))
    return path


def test_the_cache_drops_its_least_recently_used_entries_past_its_limit(tmp_path):
    from edgesd import cache

    now = 1_700_000_000.0
    old_graph = _entry(tmp_path, "unet-" + "a" * 16 + "-" + "b" * 16 + ".onnx", 100, now - 300)
    old_data = _entry(tmp_path, old_graph.name + ".data", 900, now - 300)
    blob = _entry(tmp_path, "openvino-" + "c" * 12 + "/123.blob", 1000, now - 200)
    copy = _entry(tmp_path, "openvino-" + "c" * 12 + "/static-" + "f" * 16 + ".xml", 10, now - 250)
    copy_bin = _entry(tmp_path, "openvino-" + "c" * 12 + "/static-" + "f" * 16 + ".bin", 990, now - 250)
    recent = _entry(tmp_path, "vae_decoder-" + "d" * 16 + "-" + "e" * 16 + ".onnx", 1000, now - 100)
    mine = _entry(tmp_path, "notes.txt", 5000, now - 1000)  # not edgesd's: never counted, never removed
    staging = tmp_path / ".partial-abc"
    staging.mkdir()
    os.utime(staging, (now - 2 * cache.STALE_STAGING_S,) * 2)
    assert sum(e.size for e in cache.entries(tmp_path)) == 4000
    removed = cache.prune(tmp_path, max_bytes=2000, used_since=now)
    assert set(removed) == {old_graph, old_data, copy, copy_bin}  # an entry: a graph with its data
    assert blob.exists() and recent.exists() and mine.exists() and not staging.exists()
    assert cache.prune(tmp_path, max_bytes=10, used_since=now - 150) == [blob]  # this run's entry stays
    assert recent.exists()


def test_a_cache_hit_counts_as_use_and_the_limit_is_kept_on_load(tmp_path):
    cache_dir = tmp_path / "cache"
    edgesd.Pipeline.load(OPTIMUM_ONNX, cache_dir=cache_dir)
    (unet,) = cache_dir.glob("unet-*.onnx")
    os.utime(unet, (1, 1))
    edgesd.Pipeline.load(OPTIMUM_ONNX, cache_dir=cache_dir)
    assert unet.stat().st_mtime > 1  # read from the cache: marked used
    stale = _entry(cache_dir, "unet-" + "0" * 16 + "-" + "1" * 16 + ".onnx", 10_000, 1)  # a deleted model's
    edgesd.Pipeline.load(OPTIMUM_ONNX, cache_dir=cache_dir, cache_max_gb=1e-9)
    assert not stale.exists() and unet.exists()  # over the limit: the old entry went, this run's stayed
    with pytest.raises(EdgesdError, match="cache_max_gb must be a number of GB above 0"):
        RuntimeOptions(cache_max_gb=0)
    out = tmp_path / "x.png"
    run = CliRunner().invoke(main, ["generate", "a cat", "--model", str(OPTIMUM_ONNX), "--steps", "1", "--width",
                                    "32", "--height", "32", "--cache-dir", str(cache_dir), "--cache-max-gb", "-1",
                                    "-o", str(out)])
    assert run.exit_code != 0 and "cache_max_gb must be a number of GB above 0" in run.output


@pytest.mark.parametrize("level", ["disable", "basic", "extended"])
def test_onnxruntime_optimisation_levels_agree(level):
    ref = edgesd.Pipeline.load(OPTIMUM_ONNX)("a cat", **RUN)
    got = edgesd.Pipeline.load(OPTIMUM_ONNX, ort_optimization=level, provider="cpu,cpu")("a cat", **RUN)
    np.testing.assert_allclose(got.latents, ref.latents, atol=1e-4)


def test_onnxruntime_cannot_run_ir():
    with pytest.raises(EdgesdError, match="OpenVINO IR graphs .* which ONNX Runtime cannot run"):
        edgesd.Pipeline.load(OPTIMUM_IR, backend="onnxruntime")


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_a_component_with_both_onnx_and_ir_is_an_error(tmp_path):
    folder = _copy(OPTIMUM_IR, tmp_path)
    shutil.copy(OPTIMUM_ONNX / "unet" / "model.onnx", folder / "unet" / "model.onnx")
    with pytest.raises(EdgesdError, match="holds both model.onnx and openvino_model.xml"):
        edgesd.Pipeline.load(folder)


def test_ir_without_its_weights_is_an_error(tmp_path):
    folder = _copy(OPTIMUM_IR, tmp_path)
    (folder / "vae_decoder" / "openvino_model.bin").unlink()
    with pytest.raises(EdgesdError, match="no openvino_model.bin"):
        edgesd.Pipeline.load(folder)


def test_corrupt_ir_is_a_clear_error(tmp_path):
    folder = _copy(OPTIMUM_IR, tmp_path)
    (folder / "unet" / "openvino_model.xml").write_text("<net><layers>")
    with pytest.raises(EdgesdError, match="not a readable OpenVINO graph"):
        edgesd.Pipeline.load(folder)


@pytest.mark.parametrize("kwargs, needle", [
    ({"device": "XPU"}, "OpenVINO does not know device 'XPU'"),
    ({"device": "AUTO:CPU,XPU"}, "OpenVINO does not know device 'XPU'"),
    ({"backend": "onnxruntime", "ov_hint": "throughput"}, "--ov-hint applies to the openvino backend"),
    ({"backend": "openvino", "provider": "openvino,cpu"}, "--provider applies to the onnxruntime backend"),
    ({"ov_precision": "int3"}, "unknown ov_precision 'int3'"),
    ({"threads": 0}, "threads must be a positive whole number"),
    ({"backend": "onnxruntime", "provider": "quantum"}, "unknown provider 'quantum'"),
    ({"warp_drive": True}, "unexpected keyword argument 'warp_drive'"),
])
def test_bad_runtime_options(kwargs, needle):
    folder = OPTIMUM_IR if kwargs.get("backend") != "onnxruntime" else OPTIMUM_ONNX
    with pytest.raises(EdgesdError, match=needle):
        edgesd.Pipeline.load(folder, **kwargs)


def test_openvino_device_auto_and_precision_device_default():
    pipe = edgesd.Pipeline.load(OPTIMUM_IR, device="AUTO", ov_precision="device-default")
    assert np.isfinite(pipe("a cat", **RUN).latents).all()


def test_cli_generate_with_runtime_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "x.png"
    result = runner.invoke(main, ["generate", "a cat", "--model", str(OPTIMUM_IR), "--steps", "2", "--width", "32",
                                  "--height", "32", "--seed", "1", "--threads", "1", "--ov-hint", "throughput",
                                  "--cache-dir", str(tmp_path / "cache"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    bad = runner.invoke(main, ["generate", "a cat", "--model", str(OPTIMUM_ONNX), "--ov-hint", "throughput",
                               "-o", str(tmp_path / "y.png")])
    assert bad.exit_code == 2 and "--ov-hint applies to the openvino backend" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "y.png").exists()
    bad = runner.invoke(main, ["generate", "a cat", "--model", str(OPTIMUM_ONNX), "--provider-option", "oops",
                               "-o", str(tmp_path / "y.png")])
    assert bad.exit_code == 2 and "is not KEY=VALUE" in bad.output


def test_info_describes_ir():
    result = CliRunner().invoke(main, ["info", str(OPTIMUM_IR), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["formats"] == ["openvino"]
    unet = summary["graphs"]["unet"]
    assert unet["precision"] == "fp32" and [i["name"] for i in unet["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states"]


# --- export --format openvino -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ir_int8(tiny_src, tmp_path_factory):
    from edgesd.export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("ir") / "tiny-ir-int8"
    report = export_model(tiny_src, out, ExportOptions(recipe="int8", format="openvino", allow_lossy=True,
                                                       calibration_size=2))
    assert report.passed
    return out


def test_openvino_export_keeps_a_static_int8_vae_decoder_as_onnx_qdq(tiny_src, tmp_path):
    """--format openvino --vae-recipe int8: the decoder is written as ONNX QDQ beside the IR graphs (OpenVINO
    runs it in int8; NNCF would quantize its latent input); the mixed folder loads with either backend rule."""
    from edgesd.export import ExportOptions, export_model

    out = tmp_path / "mixed"
    export_model(tiny_src, out, ExportOptions(recipe="int8-weights", format="openvino", allow_lossy=True,
                                              calibration_size=1, with_vae_encoder=False,
                                              component_overrides={"vae_decoder": "int8"}))
    manifest = json.loads((out / "edgesd.json").read_text())
    assert manifest["graphs"]["vae_decoder"] == {**manifest["graphs"]["vae_decoder"], "file": "vae_decoder/model.onnx",
                                                 "format": "onnx", "precision": "int8"}
    assert manifest["graphs"]["unet"]["format"] == "openvino"
    assert (out / "unet" / "openvino_model.xml").is_file() and not (out / "vae_decoder" / "openvino_model.xml").exists()
    pipe = edgesd.Pipeline.load(out)  # auto: OpenVINO, for the IR graphs and the ONNX one
    assert pipe.options.backend == "openvino"
    assert pipe("a red circle", num_inference_steps=2, seed=1).images[0].size == (32, 32)


def test_openvino_export_writes_ir_with_manifest_and_fidelity(tiny_ir_int8):
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (tiny_ir_int8 / component / "openvino_model.xml").is_file()
        assert (tiny_ir_int8 / component / "openvino_model.bin").is_file()
        assert not list((tiny_ir_int8 / component).glob("model.onnx*"))
    manifest = json.loads((tiny_ir_int8 / "edgesd.json").read_text())
    assert manifest["graphs"]["unet"] == {**manifest["graphs"]["unet"], "file": "unet/openvino_model.xml",
                                          "format": "openvino", "precision": "int8"}
    assert manifest["graphs"]["vae_decoder"]["precision"] == "int8-weights"
    assert json.loads((tiny_ir_int8 / "model_index.json").read_text())["_class_name"] == "OVStableDiffusionPipeline"
    fidelity = json.loads((tiny_ir_int8 / "fidelity.json").read_text())
    assert fidelity["graphs"]["unet.out_sample"]["psnr_db"] > 20
    summary = CliRunner().invoke(main, ["info", str(tiny_ir_int8), "--json"])
    graphs = json.loads(summary.output)["graphs"]
    assert graphs["vae_decoder"]["precision"] in ("int8", "uint8")


def test_openvino_export_generates_close_to_fp32(tiny_onnx, tiny_ir_int8):
    from edgesd.export.parity import psnr

    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, seed=5)
    a = edgesd.Pipeline.load(tiny_onnx)("a red circle", **kwargs)
    b = edgesd.Pipeline.load(tiny_ir_int8)("a red circle", **kwargs)
    assert b.parameters["backend"] == "openvino"
    assert psnr(np.asarray(a.images[0], np.float64), np.asarray(b.images[0], np.float64)) > 20


@pytest.mark.parametrize("recipe, weight_types", [
    ("fp32", {"f32"}), ("fp16", {"f16"}), ("int8-weights", {"u8", "i8"}), ("int4-weights", {"i4", "u4"}),
    ("int8-hybrid", {"u8", "i8"}),
])
def test_ir_recipes_store_the_recipes_weights(tiny_onnx, tmp_path, recipe, weight_types):
    import openvino as ov

    from edgesd.export.fidelity import calibration_feeds
    from edgesd.export.openvino_ir import write_ir_recipe

    feeds = calibration_feeds(tiny_onnx, ["a red circle"])["unet"][:2] if recipe == "int8-hybrid" else None
    path = write_ir_recipe(tiny_onnx / "unet" / "model.onnx", tmp_path / "unet", recipe, feeds)
    model = ov.Core().read_model(str(path))
    sizes: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            t = op.get_output_element_type(0).get_type_name()
            sizes[t] = sizes.get(t, 0) + int(np.prod(op.get_output_shape(0)))
    assert weight_types & set(sizes), sizes  # the recipe's storage type is there
    if recipe == "fp32":
        assert not {"f16", "u8", "i8", "u4", "i4"} & set(sizes), sizes
    ref = RuntimeOptions(backend="openvino")
    from edgesd.backends import load_graph
    from edgesd.graphs import GRAPHS

    rng = np.random.default_rng(0)
    hidden = json.loads((tiny_onnx / "edgesd.json").read_text())["constants"]["text_hidden_size"]
    f = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32), "timestep": np.array([10.0, 10.0], np.float32),
         "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32)}
    want = load_graph(tiny_onnx / "unet" / "model.onnx", GRAPHS["unet"], ref).run(f)["out_sample"]
    got = load_graph(path, GRAPHS["unet"], ref).run(f)["out_sample"]
    from edgesd.export.parity import psnr

    assert psnr(want, got) > 30


@pytest.mark.parametrize("kwargs, needle", [
    ({"recipe": "int8-hybrid"}, "int8-hybrid recipe cannot be written as onnx"),
    ({"recipe": "int8-hybrid", "format": "openvino", "component_overrides": {"text_encoder": "int8-hybrid"}},
     "int8-hybrid recipe .* is not for the text_encoder"),
    ({"format": "tflite"}, "unknown format 'tflite'"),
])
def test_bad_format_options(kwargs, needle):
    from edgesd.export import ExportOptions

    with pytest.raises(EdgesdError, match=needle):
        ExportOptions(**kwargs)


def test_cli_export_refuses_a_recipe_the_format_cannot_do(tiny_src, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(tiny_src), str(out), "--recipe", "int8-hybrid"])
    assert result.exit_code == 2 and "cannot be written as onnx" in result.output and "--format openvino" in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_openvino_low_memory_releases_requests_and_keeps_compile_time(monkeypatch):
    """--memory low: a finished stage's infer request (which holds its compiled model) is dropped with the
    graph; the compile time spent on it stays in the timings."""
    held = {}
    real = edgesd.pipeline.RunContext.run

    def run(ctx, name, feeds, release=True):
        held.setdefault(name, sorted(ctx.local))  # the callers' states kept when `name` first runs
        return real(ctx, name, feeds, release)

    monkeypatch.setattr(edgesd.pipeline.RunContext, "run", run)
    low = edgesd.Pipeline.load(OPTIMUM_IR, memory="low", cache="off")("a cat", **RUN)
    assert held == {"text_encoder": [], "unet": [], "vae_decoder": []}
    monkeypatch.undo()
    fast = edgesd.Pipeline.load(OPTIMUM_IR, cache="off")("a cat", **RUN)
    assert low.timings["compile_s"] > 0
    np.testing.assert_array_equal(low.latents, fast.latents)
