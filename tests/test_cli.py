"""The CLI: a working generate/info/export, and one clear line with exit code 2 for each bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .commands import edgesd
from .conftest import FIXTURES


def edgesd_process(*args):
    """A real `python -m edgesd.cli` (the README's command, in a fresh interpreter)."""
    return subprocess.run([sys.executable, "-m", "edgesd.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error") or l.startswith("Error")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_generate_writes_png_with_parameters(tiny_onnx, tmp_path):
    out = tmp_path / "cat.png"
    proc = edgesd("generate", "a red circle", "--model", tiny_onnx, "--steps", 3, "--seed", 42,
                  "--scheduler", "euler-a", "--negative", "blurry", "-o", out)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert image.size == (32, 32)  # the tiny model's default: sample_size 16 x VAE factor 2
    params = json.loads(image.text["edgesd"])
    assert params["seed"] == 42 and params["steps"] == 3 and params["scheduler"] == "euler-a"
    assert image.text["parameters"].startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")


def test_same_seed_same_image(tiny_onnx, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        assert edgesd("generate", "x", "--model", tiny_onnx, "--steps", 2, "--seed", 7, "-o", p).returncode == 0
    assert Image.open(paths[0]).tobytes() == Image.open(paths[1]).tobytes()


def test_torch_cpu_noise_is_recorded_and_changes_the_noise(tiny_onnx, tmp_path):
    images = {}
    for noise in ("numpy", "torch-cpu"):
        out = tmp_path / f"{noise}.png"
        proc = edgesd("generate", "x", "--model", tiny_onnx, "--steps", 2, "--seed", 7, "--noise", noise, "-o", out)
        assert proc.returncode == 0, proc.stderr
        images[noise] = Image.open(out)
    assert json.loads(images["torch-cpu"].text["edgesd"])["noise_generator"] == "torch-cpu"
    assert "noise_generator" not in json.loads(images["numpy"].text["edgesd"])
    assert images["numpy"].tobytes() != images["torch-cpu"].tobytes()


def test_count_writes_numbered_files(tiny_onnx, tmp_path):
    proc = edgesd("generate", "x", "--model", tiny_onnx, "--steps", 2, "--count", 2, "--width", 48,
                  "-o", tmp_path / "img.png")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "img-1.png").size == (48, 32)
    assert (tmp_path / "img-2.png").is_file()


def test_scheduler_list():
    proc = edgesd("generate", "x", "--scheduler", "list")
    assert proc.returncode == 0
    assert "dpm++2m-karras" in proc.stdout and "euler-a" in proc.stdout


def test_info(tiny_onnx):
    proc = edgesd("info", tiny_onnx, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["written_by"] == "edgesd"
    assert summary["graphs"]["unet"]["precision"] == "fp32"
    assert summary["graphs"]["unet"]["inputs"][1]["name"] == "timestep"
    assert summary["defaults"] == {"num_inference_steps": 20, "guidance_scale": 7.5}


def test_info_shows_the_default_models_own_defaults():
    proc = edgesd("info", Path(__file__).resolve().parents[1] / "models" / "edgesd-tiny")
    assert proc.returncode == 0, proc.stderr
    assert "defaults   20 steps, guidance 1.5" in proc.stdout and "unet: fp16" in proc.stdout


def test_export_prints_parity_table(tiny_src, tmp_path):
    proc = edgesd("export", tiny_src, tmp_path / "out", "--no-vae-encoder")
    assert proc.returncode == 0, proc.stderr
    assert "out_sample" in proc.stdout and " ok" in proc.stdout
    assert not (tmp_path / "out" / "vae_encoder").exists()


def test_export_with_a_recipe_and_a_component_override_prints_fidelity(tiny_src, tmp_path):
    proc = edgesd("export", tiny_src, tmp_path / "out", "--no-vae-encoder", "--recipe", "int8-weights",
                  "--vae-recipe", "fp16", "--allow-lossy")
    assert proc.returncode == 0, proc.stderr
    assert "images vs fp32: PSNR" in proc.stdout and "int8-weights" in proc.stdout
    manifest = json.loads((tmp_path / "out" / "edgesd.json").read_text())
    assert manifest["graphs"]["vae_decoder"]["precision"] == "fp16"
    assert manifest["graphs"]["unet"]["precision"] == "int8-weights"
    assert (tmp_path / "out" / "fidelity.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--recipe", "int3"], "unknown recipe 'int3'"),
    (["--unet-recipe", "bf8"], "unknown recipe 'bf8'"),
    (["--recipe", "int8", "--text-encoder-recipe", "int8"], "is not for the text_encoder"),
    (["--recipe", "int8", "--calibration-prompts", "missing.txt"], "calibration prompts file 'missing.txt' does not"),
    (["--recipe", "int8", "--calibration-prompts", "empty.txt"], "has no prompts"),
])
def test_bad_recipe_options_from_the_command_line(tiny_src, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("\n  \n")
    proc = edgesd("export", tiny_src, tmp_path / "out", *args, cwd=tmp_path)
    assert_clean_error(proc, needle)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def broken_models(tiny_onnx, tmp_path):
    """Copies of the tiny export with one defect each."""
    def make(name, damage):
        folder = tmp_path / name
        shutil.copytree(tiny_onnx, folder)
        damage(folder)
        return folder

    graph = lambda f: f / "unet" / "model.onnx"  # noqa: E731
    return {
        "no_unet": make("no_unet", lambda f: shutil.rmtree(f / "unet")),
        "corrupt": make("corrupt", lambda f: graph(f).write_bytes(b"\x08\x07garbage" * 100)),
        "truncated": make("truncated", lambda f: graph(f).write_bytes(graph(f).read_bytes()[:5000])),
    }


def test_bad_model_folders(broken_models, tmp_path):
    assert_clean_error(edgesd("generate", "x", "--model", tmp_path / "nope", "-o", tmp_path / "a.png"),
                       "does not exist")
    assert_clean_error(edgesd("generate", "x", "--model", broken_models["no_unet"], "-o", tmp_path / "a.png"),
                       "unet/model.onnx")
    for name in ("corrupt", "truncated"):
        assert_clean_error(edgesd("generate", "x", "--model", broken_models[name], "-o", tmp_path / "a.png"),
                           "not a loadable ONNX graph", "re-export")
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["--width", 33], "width 33 is not a positive multiple of 4"),
    (["--height", 30], "height 30 is not a positive multiple of 4"),
    (["--steps", 0], "steps must be between 1"),
    (["--guidance", -1], "guidance scale must be >= 0"),
    (["--guidance-cutoff", 0], "guidance_cutoff must be in (0, 1]"),
    (["--guidance-cutoff", 1.5], "guidance_cutoff must be in (0, 1]"),
    (["--scheduler", "warp-drive"], "unknown scheduler 'warp-drive'"),
    (["--provider", "quantum"], "unknown provider 'quantum'"),
    (["--count", 0], "--count must be >= 1"),
    (["--noise", "gpu"], "'gpu' is not one of 'numpy', 'torch-cpu'"),
])
def test_bad_generation_options(tiny_onnx, tmp_path, args, needle):
    proc = edgesd("generate", "x", "--model", tiny_onnx, "-o", tmp_path / "a.png", *args)
    assert_clean_error(proc, needle)
    assert not (tmp_path / "a.png").exists()


def test_output_in_missing_directory(tiny_onnx, tmp_path):
    assert_clean_error(edgesd("generate", "x", "--model", tiny_onnx, "-o", tmp_path / "no" / "a.png"),
                       "does not exist", "create it")


def test_bad_export_sources(tiny_src, tmp_path):
    assert_clean_error(edgesd("export", tmp_path / "missing", tmp_path / "out"), "does not exist")
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    shutil.rmtree(src / "unet")
    assert_clean_error(edgesd("export", src, tmp_path / "out"), "has no unet/ folder")
    assert not (tmp_path / "out").exists()
    assert_clean_error(edgesd("export", tiny_src, tmp_path / "no" / "out"), "does not exist")
    (tmp_path / "file").write_text("x")
    assert_clean_error(edgesd("export", tiny_src, tmp_path / "file"), "is not a folder")
    assert_clean_error(edgesd("export", tmp_path / "file", tmp_path / "out"), "is not a .safetensors file")


def test_generate_with_the_default_model(tmp_path):
    """No --model: the embedded trained model draws the prompt, with its own default steps and guidance."""
    from PIL import Image

    from edgesd.models.adherence import read_picture

    proc = edgesd_process("generate", "a red circle on a blue background", "--seed", 3, "-o", tmp_path / "d.png")
    assert proc.returncode == 0, proc.stderr
    image = Image.open(tmp_path / "d.png")
    reading = read_picture(image.convert("RGB"))
    assert (reading.background, reading.color, reading.shape) == ("blue", "red", "circle")
    assert "Steps: 20" in image.text["parameters"] and "CFG scale: 1.5" in image.text["parameters"]

def test_img2img_from_the_command_line(tmp_path):
    from PIL import Image

    from edgesd.models.adherence import read_picture
    from edgesd.models.training.shapes import Scene, render

    render(Scene("blue", "red", "circle", "center", "large"), 64).save(tmp_path / "start.png")
    proc = edgesd("generate", "a large green square in the top left corner on a white background", "--image",
                  tmp_path / "start.png", "--strength", 0.1, "--seed", 1, "-o", tmp_path / "out.png")
    assert proc.returncode == 0, proc.stderr
    image = Image.open(tmp_path / "out.png")
    assert read_picture(image.convert("RGB")).color == "red"  # strength 0.1 keeps the picture
    assert "Denoising strength: 0.1" in image.text["parameters"]


def test_bad_img2img_input_from_the_command_line(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    assert_clean_error(edgesd("generate", "x", "--image", tmp_path / "missing.png"), "does not exist")
    assert_clean_error(edgesd("generate", "x", "--image", tmp_path / "notes.png"), "cannot be read")
    from edgesd.models.training.shapes import Scene, render

    render(Scene("blue", "red", "circle", "center", "large"), 64).save(tmp_path / "ok.png")
    assert_clean_error(edgesd("generate", "x", "--image", tmp_path / "ok.png", "--strength", 2), "strength must be")


def test_limits_bad_text_and_huge_pictures_from_the_command_line(tmp_path):
    from PIL import Image

    bomb = tmp_path / "bomb.png"  # a small file that decodes to more pixels than Pillow allows
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)
    huge = tmp_path / "huge.png"  # 8192 x 8192: refused by its size before it is decoded
    Image.new("1", (8192, 8192)).save(huge)
    cases = [(["generate", "x", "--count", "1000000000"], "above the limit"),
             (["generate", "x", "--width", "8192", "--height", "8192", "--count", "2"], "--max-pixels"),
             (["generate", "a\udc80b"], "not valid Unicode"),
             (["generate", "x", "--image", bomb], "decompression bomb"),
             (["generate", "x", "--image", huge], "is 8192x8192, above the limit of 16,777,216 pixels")]
    for args, needle in cases:
        proc = edgesd(*args, "-o", tmp_path / "a.png")
        assert_clean_error(proc, needle)
        assert not (tmp_path / "a.png").exists()


def test_info_on_an_empty_graph_and_unwritable_outputs(tiny_onnx, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_onnx, broken)
    (broken / "unet" / "model.onnx").write_bytes(b"")
    assert_clean_error(edgesd("info", broken), "is not a readable ONNX graph (the file is empty)")
    (tmp_path / "out.png").mkdir()
    assert_clean_error(edgesd("generate", "x", "-o", tmp_path / "out.png"), "is a folder")


def test_a_failed_write_leaves_no_half_written_picture(tmp_path, monkeypatch):
    """A write that fails part way (a full disk, here simulated) leaves neither the picture nor its temporary
    file."""
    import errno

    from edgesd.errors import EdgesdError
    from edgesd.images import save_png

    write_bytes = Path.write_bytes

    def half_then_full(path, data):
        write_bytes(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "a.png"
    params = {"prompt": "x", "steps": 1, "scheduler": "euler", "guidance_scale": 1, "seed": 1, "width": 8,
              "height": 8, "model": "m"}
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", half_then_full)
        with pytest.raises(EdgesdError, match=r"cannot write .* \(No space left"):
            save_png(Image.new("RGB", (8, 8)), target, params)
    assert not list(tmp_path.iterdir())
    save_png(Image.new("RGB", (8, 8)), target, params)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_a_missing_export_source_is_said_before_torch_loads(tmp_path):
    from .test_lean_runtime import run_blocked

    proc = run_blocked(f"""
        from edgesd.cli import main
        main(["export", {str(tmp_path / "missing")!r}, {str(tmp_path / "out")!r}])
    """)
    assert proc.returncode == 2 and "source" in proc.stderr and "does not exist" in proc.stderr, proc.stderr


def test_sigterm_and_stale_partials_leave_no_hidden_folder(tiny_src, tmp_path):
    import os
    import signal
    import time

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid is free now: a killed export's partial folder
    stale = tmp_path / f".out.partial-{ended.pid}"
    stale.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "edgesd.cli", "export", str(tiny_src), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(f".out.partial-{proc.pid}")):
        time.sleep(0.05)
    assert list(tmp_path.glob(f".out.partial-{proc.pid}")), "the export never started"
    assert not stale.exists()  # removed when the export began: its process was gone
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def _edit_json(rel: str, change):
    def edit(folder: Path) -> None:
        path = folder / rel
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


def test_a_symlinked_ir_weights_file_is_refused(tmp_path):
    from edgesd.errors import EdgesdError
    from edgesd.tensor_files import check_graph_files

    (tmp_path / "elsewhere.bin").write_bytes(b"\0" * 16)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "openvino_model.xml").write_text("<net name='x' version='11'><layers/><edges/></net>")
    (folder / "openvino_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(EdgesdError, match="is a symbolic link"):
        check_graph_files(folder / "openvino_model.xml")


@pytest.mark.parametrize("edit, needle", [
    (_edit_json("edgesd.json", lambda j: j["constants"].update(vae_scale_factor=0)), "vae_scale_factor=0"),
    (_edit_json("edgesd.json", lambda j: j["constants"].update(vae_scale_factor="4")), "vae_scale_factor='4'"),
    (_edit_json("edgesd.json", lambda j: j["constants"].update(latent_size_multiple=0)), "latent_size_multiple=0"),
    (_edit_json("edgesd.json", lambda j: j.setdefault("defaults", {}).update(num_inference_steps=2.5)),
     "default steps 2.5"),
    (_edit_json("scheduler/scheduler_config.json", lambda j: j.update(num_train_timesteps=0)), "num_train_timesteps=0"),
    (_edit_json("scheduler/scheduler_config.json", lambda j: j.update(num_train_timesteps="1000")),
     "num_train_timesteps='1000'"),
    (_edit_json("scheduler/scheduler_config.json", lambda j: j.update(beta_start=0.01, beta_end=0.0001)),
     "is below beta_start"),
    (_edit_json("scheduler/scheduler_config.json", lambda j: j.update(beta_end=float("nan"))), "beta_end=nan"),
    (_edit_json("scheduler/scheduler_config.json", lambda j: j.update(num_train_timesteps=2)),
     "more than the model's 2 training timesteps"),
    (_edit_json("tokenizer/vocab.json", lambda j: j.update({"!": "x"})), "the id 'x'"),
    (_edit_json("tokenizer/tokenizer_config.json", lambda j: j.update(model_max_length=0)), "model_max_length 0"),
])
def test_hand_edited_model_folders_are_named(tmp_path, edit, needle):
    from edgesd.models_path import default_model_path

    from click.testing import CliRunner

    from edgesd.cli import main

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    edit(model)
    # in-process (the other CLI tests run the command as a process; eleven more would cost CI half a minute)
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(model), "--steps", "3", "-o",
                                       str(tmp_path / "a.png")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.output
    assert not (tmp_path / "a.png").exists()
