"""DeepCache (Ma et al. 2023): the graphs `edgesd deepcache` cuts from an exported U-Net, and generation with
--deepcache-interval N (the whole U-Net every N-th evaluation, the shallow path on its kept features between)."""

import json
import shutil

import numpy as np
import pytest

import edgesd
from edgesd.errors import EdgesdError
from edgesd.export.deepcache import SHALLOW_MIN_PSNR_DB, add_deepcache
from edgesd.export.parity import psnr
from edgesd.models_path import default_model_path

from .commands import edgesd as run_edgesd
from .conftest import FIXTURES

PROMPT = "a red circle on a blue background"


def _copy(src, tmp_path_factory, name):
    out = tmp_path_factory.mktemp(name) / "model"
    shutil.copytree(src, out)
    return out


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A copy of the embedded model with DeepCache's graphs, and the cut's parity result."""
    out = _copy(default_model_path(), tmp_path_factory, "deepcache")
    return out, add_deepcache(out)


def test_the_cut_passes_its_parity_check_and_is_described(cached):
    folder, result = cached
    assert result.passed and result.psnr_db >= SHALLOW_MIN_PSNR_DB
    assert (folder / "unet_shallow" / "model.onnx").is_file()
    manifest = json.loads((folder / "edgesd.json").read_text())
    assert [o["name"] for o in manifest["graphs"]["unet"]["outputs"]] == ["out_sample", "deep_features"]
    shallow = manifest["graphs"]["unet_shallow"]
    assert [i["name"] for i in shallow["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "deep_features"]
    assert shallow["file"] == "unet_shallow/model.onnx"
    with pytest.raises(EdgesdError, match="has DeepCache's graphs already"):
        add_deepcache(folder)


def test_interval_one_is_the_ordinary_picture(cached):
    folder, _ = cached
    ordinary = edgesd.Pipeline.load()(PROMPT, num_inference_steps=4, seed=1)
    same = edgesd.Pipeline.load(folder)(PROMPT, num_inference_steps=4, seed=1, deepcache_interval=1)
    np.testing.assert_array_equal(same.latents, ordinary.latents)
    assert "unet_shallow_calls" not in same.timings and "deepcache_interval" not in same.parameters


@pytest.mark.parametrize("interval, batch, full, shallow", [
    (2, "joint", 5, 5),  # 10 evaluations: whole at 0, 2, 4, 6, 8
    (3, "joint", 4, 6),  # whole at 0, 3, 6, 9
    (2, "split", 10, 10),  # each half (negative, positive prompt) keeps its own features
])
def test_the_whole_unet_runs_every_nth_evaluation_of_each_conditioning(cached, interval, batch, full, shallow):
    folder, _ = cached
    pipe = edgesd.Pipeline.load(folder, guidance_batch=batch)
    result = pipe(PROMPT, num_inference_steps=10, seed=1, scheduler="euler", deepcache_interval=interval)
    assert (result.timings["unet_calls"], result.timings["unet_shallow_calls"]) == (full, shallow)
    assert result.parameters["deepcache_interval"] == interval


def test_reused_features_give_a_near_picture_not_the_same(cached):
    """The embedded model at 20 steps: interval 2 is another picture of the same scene (34.6 dB when measured)."""
    folder, _ = cached
    pipe = edgesd.Pipeline.load(folder)
    ordinary = pipe(PROMPT, num_inference_steps=20, seed=1, scheduler="euler")
    reused = pipe(PROMPT, num_inference_steps=20, seed=1, scheduler="euler", deepcache_interval=2)
    score = psnr(np.asarray(ordinary.images[0], np.float64), np.asarray(reused.images[0], np.float64))
    assert 25.0 < score < 60.0


def test_other_exports_and_families_are_cut_too(tmp_path_factory):
    """optimum's ONNX export, and SDXL's U-Net with its extra conditioning inputs."""
    from edgesd.tokenizer import ClipTokenizer, packaged_vocab

    for fixture in ("optimum-onnx-micro", "optimum-onnx-sdxl-micro"):
        folder = _copy(FIXTURES / fixture, tmp_path_factory, fixture)
        if fixture.endswith("sdxl-micro"):  # its tokenizers are left out of the fixture (test_families writes them)
            for tokenizer, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
                ClipTokenizer(*packaged_vocab(), pad_token=pad).write_folder(folder / tokenizer)
        assert add_deepcache(folder).passed
        pipe = edgesd.Pipeline.load(folder)
        result = pipe("a cat", num_inference_steps=4, seed=1, deepcache_interval=2)
        assert result.timings["unet_shallow_calls"] > 0 and np.isfinite(result.latents).all()


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_a_bad_interval_is_named(cached, value):
    folder, _ = cached
    with pytest.raises(EdgesdError, match="deepcache_interval must be a whole number >= 1"):
        edgesd.Pipeline.load(folder)(PROMPT, num_inference_steps=2, deepcache_interval=value)


def test_a_model_without_the_graphs_says_how_to_add_them(tmp_path):
    with pytest.raises(EdgesdError, match=r"has no DeepCache graphs .* `edgesd deepcache MODEL`"):
        edgesd.Pipeline.load()(PROMPT, num_inference_steps=2, deepcache_interval=2)
    with pytest.raises(EdgesdError, match="the embedded default model is part of the installation"):
        add_deepcache(default_model_path())
    with pytest.raises(EdgesdError, match="edgesd deepcache works on an ONNX one"):
        add_deepcache(FIXTURES / "optimum-intel-micro")  # nothing is written there: it fails first


def test_a_failed_cut_changes_nothing(tmp_path, monkeypatch):
    from edgesd.export import deepcache

    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    failing = deepcache.ParityResult("unet_shallow", "out_sample", 12.0, 1.0, SHALLOW_MIN_PSNR_DB)
    monkeypatch.setattr(deepcache, "_parity", lambda *args: failing)  # a cut that went wrong
    with pytest.raises(EdgesdError, match="nothing was changed"):
        add_deepcache(folder)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before


def test_the_command_line(cached, tmp_path):
    folder, _ = cached
    copy = tmp_path / "model"
    shutil.copytree(default_model_path(), copy)
    done = run_edgesd("deepcache", copy)
    assert done.returncode == 0 and "unet_shallow" in done.stdout and "ok" in done.stdout, done.stderr
    out = tmp_path / "a.png"
    done = run_edgesd("generate", PROMPT, "--model", folder, "--steps", 4, "--deepcache-interval", 2, "-o", out)
    assert done.returncode == 0, done.stderr
    again = run_edgesd("generate", "--from", out, "--model", folder, "-o", tmp_path / "b.png")
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.asarray(edgesd.images.Image.open(out)),
                                  np.asarray(edgesd.images.Image.open(tmp_path / "b.png")))
    done = run_edgesd("generate", PROMPT, "--steps", 2, "--deepcache-interval", 2, "-o", tmp_path / "c.png")
    assert done.returncode != 0 and "has no DeepCache graphs" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_installation_without_the_embedded_model_can_add_the_graphs(tmp_path, monkeypatch):
    import edgesd.models_path

    def missing():
        raise EdgesdError("no embedded default model is installed")

    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    monkeypatch.setattr(edgesd.models_path, "default_model_path", missing)
    assert add_deepcache(folder).passed
