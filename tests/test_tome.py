"""Token merging (ToMe for SD, Bolya & Hoffman 2023): the graph `edgesd tome` makes from an exported U-Net,
checked against diffusers' pipeline running tomesd's own merge in its self-attention, and --token-merging."""

import json
import shutil

import numpy as np
import pytest

import edgesd
from edgesd.errors import EdgesdError
from edgesd.export.parity import psnr
from edgesd.export.tome import UNMERGED_MIN_PSNR_DB, add_tome
from edgesd.models_path import default_model_path

from .commands import edgesd as run_edgesd
from .conftest import FIXTURES

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
tomesd_merge = pytest.importorskip("tomesd.merge")

PROMPT = "a small red circle on a blue background"
MIN_PSNR_DB = 40.0


def _copy(src, tmp_path_factory, name):
    out = tmp_path_factory.mktemp(name) / "model"
    shutil.copytree(src, out)
    return out


@pytest.fixture(scope="module")
def merged(tiny_onnx, tmp_path_factory):
    """A copy of the tiny random SD export with the token-merging U-Net, and its parity result."""
    out = _copy(tiny_onnx, tmp_path_factory, "tome")
    return out, add_tome(out)


class _ToMeAttention:
    """A diffusers attention processor: tomesd's merge before the self-attention, its unmerge after (what
    tomesd's patched transformer block does around attn1)."""

    def __init__(self, ratio: float, grid: tuple[int, int]):
        self.ratio, self.grid = ratio, grid
        self.inner = diffusers.models.attention_processor.AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        h, w = self.grid
        merge, unmerge = tomesd_merge.bipartite_soft_matching_random2d(
            hidden_states, w, h, 2, 2, int(h * w * self.ratio), no_rand=True)
        return unmerge(self.inner(attn, merge(hidden_states), encoder_hidden_states, attention_mask, temb))


def _diffusers_with_tome(src, ratio: float, grid: tuple[int, int]):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    for block in (unet.down_blocks[0], unet.up_blocks[-1]):  # the full-resolution level
        for attention in block.attentions:
            for transformer in attention.transformer_blocks:
                transformer.attn1.set_processor(_ToMeAttention(ratio, grid))
    return pipe


def test_the_graph_passes_its_parity_check_and_is_described(merged):
    folder, result = merged
    assert result.passed and result.psnr_db >= UNMERGED_MIN_PSNR_DB
    manifest = json.loads((folder / "edgesd.json").read_text())
    entry = manifest["graphs"]["unet_tome"]
    assert [i["name"] for i in entry["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "tome_ratio"]
    assert entry["file"] == "unet/model_tome.onnx" and entry["merged_levels"] == 1
    with pytest.raises(EdgesdError, match="has the token-merging U-Net already"):
        add_tome(folder)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_token_merging_matches_diffusers_with_tomesd(merged, tiny_src, ratio):
    folder, _ = merged
    ours = edgesd.Pipeline.load(folder)
    size = ours.constants.default_image_size
    latent = size // ours.constants.vae_scale_factor
    latents = np.random.default_rng(3).standard_normal((1, 4, latent, latent), dtype=np.float32)
    reference = _diffusers_with_tome(tiny_src, ratio, (latent, latent))
    expected = reference(PROMPT, num_inference_steps=6, guidance_scale=7.5, latents=torch.from_numpy(latents),
                         output_type="np").images[0] * 255
    got = ours(PROMPT, num_inference_steps=6, guidance_scale=7.5, latents=latents, scheduler="euler",
               token_merging=ratio)
    assert got.parameters["token_merging"] == ratio
    assert psnr(expected, np.asarray(got.images[0], np.float64)) >= MIN_PSNR_DB
    # and merging changed the picture: the plain U-Net's is further from diffusers' ToMe one
    plain = ours(PROMPT, num_inference_steps=6, guidance_scale=7.5, latents=latents, scheduler="euler")
    assert got.timings["unet_calls"] == 0 and got.timings["unet_tome_calls"] == plain.timings["unet_calls"] > 0
    assert psnr(expected, np.asarray(plain.images[0], np.float64)) < psnr(expected, np.asarray(got.images[0], np.float64))


def test_external_weights_are_the_unets_own_file(tiny_onnx, tmp_path):
    import onnx

    folder = tmp_path / "external"
    shutil.copytree(tiny_onnx, folder)
    unet = folder / "unet" / "model.onnx"
    onnx.save(onnx.load(str(unet)), str(unet), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    before = {p.name for p in (folder / "unet").iterdir()}
    add_tome(folder)
    # beside the U-Net's graph, reading its weights file: nothing copied or linked
    assert {p.name for p in (folder / "unet").iterdir()} - before == {"model_tome.onnx"}
    assert (folder / "unet" / "model.onnx.data").stat().st_nlink == 1
    assert (folder / "unet" / "model_tome.onnx").stat().st_size < 1_000_000
    onnx.load(str(folder / "unet" / "model.onnx"))  # onnx still loads the U-Net with its weights
    out = edgesd.Pipeline.load(folder)(PROMPT, num_inference_steps=2, seed=1, token_merging=0.5)
    assert out.timings["unet_calls"] == 0 and out.timings["unet_tome_calls"] > 0


def test_ratio_zero_runs_the_ordinary_unet(merged):
    folder, _ = merged
    pipe = edgesd.Pipeline.load(folder)
    plain = pipe(PROMPT, num_inference_steps=3, seed=1)
    same = pipe(PROMPT, num_inference_steps=3, seed=1, token_merging=0.0)
    np.testing.assert_array_equal(same.latents, plain.latents)
    assert "unet_tome_calls" not in same.timings and "token_merging" not in same.parameters


def test_bad_requests_are_one_line_errors(merged, tiny_onnx):
    folder, _ = merged
    with pytest.raises(EdgesdError, match="has no token-merging U-Net"):
        edgesd.Pipeline.load(tiny_onnx)(PROMPT, num_inference_steps=2, token_merging=0.5)
    pipe = edgesd.Pipeline.load(folder)
    for bad in (0.8, -0.1, "half", True):
        with pytest.raises(EdgesdError, match="token_merging must be a share"):
            pipe(PROMPT, num_inference_steps=2, token_merging=bad)
    multiple = pipe.constants.image_size_multiple
    factor = pipe.constants.vae_scale_factor * 2
    if multiple % factor:  # a size the model takes but whose token grid is odd
        odd = next(s for s in range(multiple, 20 * multiple, multiple) if s % factor)
        with pytest.raises(EdgesdError, match="token merging needs the width in steps of"):
            pipe(PROMPT, num_inference_steps=2, token_merging=0.5, width=odd)


def test_tome_with_deepcache_is_refused(tiny_onnx, tmp_path):
    from edgesd.export.deepcache import add_deepcache

    folder = tmp_path / "both"
    shutil.copytree(tiny_onnx, folder)
    add_tome(folder)
    add_deepcache(folder)  # after: the U-Net gains DeepCache's output, the token-merging graph keeps its own
    pipe = edgesd.Pipeline.load(folder)
    with pytest.raises(EdgesdError, match="token merging and DeepCache together"):
        pipe(PROMPT, num_inference_steps=2, token_merging=0.5, deepcache_interval=2)
    # each on its own still runs
    assert pipe(PROMPT, num_inference_steps=2, token_merging=0.5).timings["unet_tome_calls"] > 0
    assert pipe(PROMPT, num_inference_steps=2, deepcache_interval=2).timings["unet_shallow_calls"] > 0


def test_the_embedded_model_and_ir_are_refused(tmp_path):
    with pytest.raises(EdgesdError, match="embedded default model is part of the installation"):
        add_tome(default_model_path())
    with pytest.raises(EdgesdError, match="levels must be a whole number"):
        add_tome(default_model_path(), levels=0)
    with pytest.raises(EdgesdError, match="edgesd tome works on an ONNX one"):
        add_tome(FIXTURES / "optimum-intel-micro")


def test_no_self_attention_at_the_levels_is_an_error(tiny_onnx, tmp_path):
    import onnx

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_onnx, folder)
    # a U-Net whose node names are not diffusers' module names
    model = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        node.name = node.name.replace("attn1", "self_attention")
    onnx.save(model, str(folder / "unet" / "model.onnx"))
    before = sorted(p.name for p in (folder / "unet").iterdir())
    with pytest.raises(EdgesdError, match="no self-attention at levels 1-1"):
        add_tome(folder)
    assert sorted(p.name for p in (folder / "unet").iterdir()) == before


def test_cli_adds_and_generates(tiny_onnx, tmp_path):
    folder = tmp_path / "cli"
    shutil.copytree(tiny_onnx, folder)
    out = run_edgesd("tome", str(folder))
    assert out.returncode == 0, out.stderr
    assert "unet_tome" in out.stdout and "--token-merging" in out.stdout
    png = tmp_path / "a.png"
    out = run_edgesd("generate", PROMPT, "--model", str(folder), "--steps", "2", "--seed", "1",
                     "--token-merging", "0.5", "-o", str(png))
    assert out.returncode == 0, out.stderr
    again = run_edgesd("generate", "--from", str(png), "--model", str(folder), "-o", str(tmp_path / "b.png"))
    assert again.returncode == 0, again.stderr
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "b.png")))
    assert json.loads(Image.open(png).text["edgesd"])["token_merging"] == 0.5
    out = run_edgesd("generate", PROMPT, "--model", str(tiny_onnx), "--token-merging", "0.5", "-o",
                     str(tmp_path / "c.png"))
    assert out.returncode != 0 and "edgesd tome MODEL" in out.stderr and "Traceback" not in out.stderr


def test_one_unet_is_resident_at_a_time(merged):
    """The token-merging U-Net holds the U-Net's weights again: a request for one frees the other."""
    folder, _ = merged
    pipe = edgesd.Pipeline.load(folder)
    assert "unet" in pipe.graphs and "unet_tome" not in pipe.graphs
    pipe(PROMPT, num_inference_steps=2, seed=1, token_merging=0.5)
    assert "unet_tome" in pipe.graphs and "unet" not in pipe.graphs
    again = pipe(PROMPT, num_inference_steps=2, seed=1)
    assert "unet" in pipe.graphs and "unet_tome" not in pipe.graphs
    assert again.timings["unet_calls"] > 0
