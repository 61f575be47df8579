"""TAESD as the decoder, and tiled VAE decode / encode, against diffusers on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgesd
from edgesd.errors import EdgesdError
from edgesd.export.parity import psnr
from edgesd.tiling import Tiles, should_tile, tiled

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TAESD_TINY = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                  num_decoder_blocks=(1, 2), latent_channels=4)  # one upsampling: the tiny SD VAE's factor 2


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """(diffusers AutoencoderTiny folder, our export of it)."""
    from edgesd.export import export_model

    root = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(7)
    diffusers.AutoencoderTiny(**TAESD_TINY).save_pretrained(root / "taesd")
    # as in madebyollin/taesd: the original layout's decoder file beside diffusers' (which is what is read)
    from safetensors.torch import save_file

    save_file({"1.conv.0.weight": torch.zeros(8, 8, 3, 3)}, str(root / "taesd" / "taesd_decoder.safetensors"))
    export_model(root / "taesd", root / "onnx")
    return root / "taesd", root / "onnx"


def test_taesd_decodes_like_diffusers_autoencoder_tiny(tiny_src, tiny_onnx, taesd):
    """diffusers' StableDiffusionPipeline with vae=AutoencoderTiny and ours with vae_decoder: same picture."""
    tiny_vae = diffusers.AutoencoderTiny.from_pretrained(taesd[0])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_src, vae=tiny_vae, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(1).standard_normal((1, 4, 32, 32)).astype(np.float32)
    expected = ref("a red square", num_inference_steps=4, height=64, width=64, latents=torch.from_numpy(latents),
                   output_type="np").images[0] * 255
    ours = edgesd.Pipeline.load(tiny_onnx, vae_decoder=taesd[1])
    got = ours("a red square", num_inference_steps=4, height=64, width=64, latents=latents)
    assert psnr(expected, np.asarray(got.images[0], np.float64)) >= 40
    own = edgesd.Pipeline.load(tiny_onnx)("a red square", num_inference_steps=4, height=64, width=64, latents=latents)
    np.testing.assert_allclose(own.latents, got.latents)  # only the decoder changed
    assert not np.array_equal(np.asarray(own.images[0]), np.asarray(got.images[0]))


def test_tiled_decode_and_encode_are_close_to_diffusers_tiling(tiny_src, tiny_onnx):
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_src, subfolder="vae")
    vae.enable_tiling()
    pipe = edgesd.Pipeline.load(tiny_onnx)
    scaling = vae.config.scaling_factor
    latents = np.random.default_rng(2).standard_normal((1, 4, 48, 40)).astype(np.float32)  # 96 x 80 pixels
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents / scaling)).sample.numpy()
    expected = ((expected[0].transpose(1, 2, 0) + 1) * 127.5).clip(0, 255)
    got = np.asarray(pipe.decode(latents, tiling="on")[0], np.float64)
    untiled = np.asarray(pipe.decode(latents, tiling="off")[0], np.float64)
    assert psnr(expected, got) >= 35
    assert psnr(expected, got) > psnr(expected, untiled) + 3  # tiling changes the picture, as diffusers' does
    pixels = np.random.default_rng(3).uniform(-1, 1, (1, 3, 96, 80)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(pixels)).latent_dist.mean.numpy() * scaling
    encoded = pipe._encode_pixels(pixels, edgesd.pipeline.RunContext(pipe), "on")
    assert psnr(mean, encoded) >= 35


@pytest.mark.parametrize("height, width", [(40, 56), (16, 16), (10, 30)])
def test_tiles_put_each_output_where_it_belongs(height, width):
    """A "decoder" that only repeats each latent pixel 8 x 8 gives, tiled, exactly its whole output: every tile,
    the edge ones moved back inside included, lands in its place, and the blends mix equal values."""
    x = np.random.default_rng(0).standard_normal((1, 2, height, width)).astype(np.float32)
    shapes = set()

    def upsample(z):
        shapes.add(z.shape)
        return z.repeat(8, axis=2).repeat(8, axis=3)

    got = tiled(x, upsample, Tiles(size_in=16, size_out=128))
    assert shapes == {(1, 2, min(height, 16), min(width, 16))}  # one tile shape, no larger than the picture
    np.testing.assert_allclose(got, upsample(x), rtol=0, atol=1e-6)


def test_tiling_switches_on_from_four_tiles_and_a_megapixel():
    assert not should_tile("auto", 768, 768, 512) and should_tile("auto", 1024, 1024, 512)
    assert should_tile("auto", 2048, 512, 512) and not should_tile("off", 4096, 4096, 512)
    assert not should_tile("auto", 1024, 1024, 1024) and should_tile("auto", 2048, 2048, 1024)  # SDXL
    assert not should_tile("auto", 256, 256, 32)  # a tiny test VAE: never by default
    assert should_tile("on", 768, 512, 512) and not should_tile("on", 512, 512, 512)


def test_auto_tiling_is_recorded_and_bad_values_refused(tiny_onnx):
    pipe = edgesd.Pipeline.load(tiny_onnx)
    result = pipe("x", num_inference_steps=1, height=64, width=64, seed=1, vae_tiling="on")
    assert result.parameters["vae_tiling"] == "on"
    with pytest.raises(EdgesdError, match="unknown vae_tiling 'yes'"):
        pipe("x", num_inference_steps=1, vae_tiling="yes")


def test_bad_vae_decoders_are_named(tiny_onnx, taesd, tmp_path):
    with pytest.raises(EdgesdError, match="is a diffusers VAE folder, not an exported decoder"):
        edgesd.Pipeline.load(tiny_onnx, vae_decoder=taesd[0])
    with pytest.raises(EdgesdError, match="does not exist"):
        edgesd.Pipeline.load(tiny_onnx, vae_decoder=tmp_path / "none")
    torch.manual_seed(0)
    diffusers.AutoencoderTiny(**{**TAESD_TINY, "latent_channels": 8}).save_pretrained(tmp_path / "wide")
    from edgesd.export import export_model

    export_model(tmp_path / "wide", tmp_path / "wide-onnx")
    with pytest.raises(EdgesdError, match="takes 8 latent channels, the model makes 4"):
        edgesd.Pipeline.load(tiny_onnx, vae_decoder=tmp_path / "wide-onnx")
    manifest = json.loads((tmp_path / "wide-onnx" / "edgesd.json").read_text())
    assert manifest["kind"] == "vae_decoder" and manifest["vae_class"] == "AutoencoderTiny"


def test_taesd_from_the_command_line(tiny_onnx, taesd, tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "edgesd.cli", "generate", "a cat", "--model", str(tiny_onnx),
                          "--vae-decoder", str(taesd[1]), "--steps", "2", "--seed", "3", "--vae-tiling", "off",
                          "-o", str(tmp_path / "a.png")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "a.png").is_file()


def test_vae_tile_size_sets_the_tiles(monkeypatch):
    pipe = edgesd.Pipeline.load()  # its VAE's sample size: 64 pixels
    graph = pipe.graph("vae_decoder")
    shapes = []
    run = graph.run
    monkeypatch.setattr(graph, "run", lambda feeds, local=None, release=False:
                        shapes.append(feeds["latent_sample"].shape) or run(feeds, local, release))
    whole = pipe("a red circle", num_inference_steps=1, height=256, width=256, seed=1, vae_tiling="off")
    tiled = pipe("a red circle", num_inference_steps=1, height=256, width=256, seed=1, vae_tiling="on",
                 vae_tile_size=128)
    # one whole decode (4 pixels per latent pixel), then tiles of 32 latent pixels every 24 (a quarter
    # overlapping): 3 x 3, those at the edges moved back inside, so all of one shape
    assert shapes[0] == (1, 4, 64, 64) and len(shapes) == 10
    assert {s[2:] for s in shapes[1:]} == {(32, 32)}
    assert tiled.parameters["vae_tile_size"] == 128
    a, b = (np.asarray(r.images[0], np.float32) for r in (whole, tiled))
    assert 0 < np.abs(a - b).mean() < 8  # blended tiles: close to the whole picture, not equal
    for bad in (100, 64, True):
        with pytest.raises(EdgesdError, match="vae_tile_size must be a multiple of 64 pixels, at least 128"):
            pipe("x", num_inference_steps=1, vae_tile_size=bad)
