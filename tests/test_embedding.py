"""Embedding: step previews through the progress callback, and re-running a picture's parameters (--from)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import edgesd
from edgesd.errors import Cancelled, EdgesdError
from edgesd.images import parse_parameters_text

from .commands import edgesd as run_edgesd

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return edgesd.Pipeline.load()  # the default model


def test_a_three_argument_callback_gets_previews(pipe):
    seen = []

    def on_step(step, total, preview):
        pictures = preview()
        seen.append((step, total, len(pictures), pictures[0].size))

    result = pipe(PROMPT, seed=1, num_inference_steps=6, callback=on_step, num_images_per_prompt=2)
    latent = pipe.constants.sample_size
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1)) and seen[-1][0] == seen[-1][1] >= 6
    assert all(s[2:] == (2, (latent, latent)) for s in seen)
    final = np.asarray(pipe.previewer(result.latents)[0].resize(result.images[0].size), np.float64)
    picture = np.asarray(result.images[0], np.float64)
    grey = np.full_like(picture, picture.mean())
    assert np.abs(final - picture).mean() < np.abs(grey - picture).mean()  # the map tells colours apart
    plain = []
    pipe(PROMPT, seed=1, num_inference_steps=2, callback=lambda step, total: plain.append(step))
    assert plain[:2] == [1, 2]  # the two-argument form is unchanged


def test_a_preview_callback_can_cancel(pipe):
    with pytest.raises(Cancelled, match="after step 2"):
        pipe(PROMPT, seed=1, num_inference_steps=5, callback=lambda s, n, preview: s < 2 and preview() and None)


def test_preview_with_a_fast_decoder_decodes(tiny_onnx, tmp_path):
    import torch
    import diffusers

    from edgesd.export import export_model

    torch.manual_seed(0)
    diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                              num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 2)).save_pretrained(tmp_path / "t")
    export_model(tmp_path / "t", tmp_path / "t-onnx")
    fast = edgesd.Pipeline.load(tiny_onnx, vae_decoder=tmp_path / "t-onnx")
    sizes = []
    result = fast("x", seed=2, num_inference_steps=2, height=64, width=64,
                  callback=lambda s, n, preview: sizes.append(preview()[0].size))
    assert set(sizes) == {(64, 64)} and result.images[0].size == (64, 64)  # decoded at full size


A1111_TEXT = """masterpiece, a castle on a hill
at dawn
Negative prompt: blurry, lowres
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 12345, Size: 512x768, \
Model hash: 8a3c, Model: dreamshaper_8, Lora hashes: "watercolor: 1a2b, ink: 3c4d", Version: v1.10.1"""


def test_a1111_parameters_text_is_read():
    got = parse_parameters_text(A1111_TEXT)
    assert got == {"prompt": "masterpiece, a castle on a hill\nat dawn", "negative_prompt": "blurry, lowres",
                   "num_inference_steps": 28, "scheduler": "DPM++ 2M Karras", "guidance_scale": 6.5,
                   "seed": 12345, "width": 512, "height": 768}
    assert parse_parameters_text("just a prompt") == {"prompt": "just a prompt"}


def test_generate_from_a_picture_repeats_it_and_options_override(tmp_path):
    first = tmp_path / "first.png"
    assert run_edgesd("generate", PROMPT, "--seed", 3, "--steps", 8, "--scheduler", "DPM++ 2M Karras", "--guidance", 2,
                "-o", first).returncode == 0
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert run_edgesd("generate", "--from", first, "-o", again).returncode == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert run_edgesd("generate", "--from", first, "--seed", 4, "-o", other).returncode == 0
    assert "Seed: 4" in Image.open(other).text["parameters"]
    assert "Steps: 8, Sampler: DPM++ 2M Karras, CFG scale: 2.0" in Image.open(other).text["parameters"]
    a1111 = tmp_path / "a1111.png"  # only A1111's text chunk, as A1111 writes it
    info = PngInfo()
    info.add_text("parameters", "a blue square on a white background\nSteps: 5, Sampler: Euler a, CFG scale: 1.5, "
                                "Seed: 9, Size: 64x64, Model hash: 1234, Model: other")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    out = tmp_path / "from-a1111.png"
    assert run_edgesd("generate", "--from", a1111, "-o", out).returncode == 0
    text = Image.open(out).text["parameters"]
    assert text.startswith("a blue square on a white background\nSteps: 5, Sampler: Euler a, CFG scale: 1.5, Seed: 9")


def test_bad_from_pictures_are_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    for args, needle in ((["--from", tmp_path / "bare.png"], "carries no generation parameters"),
                         (["--from", tmp_path / "none.png"], "does not exist"),
                         ([], "no prompt given")):
        run = run_edgesd("generate", *args, "-o", tmp_path / "x.png")
        assert run.returncode == 2 and run.stderr.count("error:") == 1 and needle in run.stderr, run.stderr
        assert not (tmp_path / "x.png").exists()
    with pytest.raises(EdgesdError):
        parse_parameters_text("p\nSteps: many, Sampler: Euler")
