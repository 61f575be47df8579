"""img2img: a starting picture noised to `strength`, equal to diffusers' StableDiffusionImg2ImgPipeline."""

import numpy as np
import pytest
from PIL import Image

import edgesd
from edgesd.errors import EdgesdError
from edgesd.export.parity import psnr

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a small red circle on a blue background"


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return edgesd.Pipeline.load(tiny_onnx)


@pytest.fixture(scope="module")
def start_image():
    rng = np.random.default_rng(0)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (30, 70, 220)
    pixels[16:48, 16:48] = (220, 30, 30)
    return Image.fromarray(np.clip(pixels + rng.integers(0, 20, pixels.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("scheduler, cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"),
                                            ("dpm++2m", "DPMSolverMultistepScheduler"), ("pndm", "PNDMScheduler")])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_equals_diffusers(pipe, tiny_src, start_image, scheduler, cls, strength):
    """Same clean latents (ours, given to diffusers as 4-channel `image`) and same noise: same picture."""
    x0 = pipe.encode_image(start_image, 64, 64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_src, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config)
    expected = ref(PROMPT, image=torch.from_numpy(x0), strength=strength, num_inference_steps=10,
                   guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="np").images[0] * 255
    ours = pipe(PROMPT, image=start_image, strength=strength, num_inference_steps=10, guidance_scale=5.0,
                latents=noise.numpy(), scheduler=scheduler)
    assert psnr(expected, np.asarray(ours.images[0], np.float64)) >= 40
    assert ours.parameters["strength"] == strength
    assert ours.timings["unet_evaluations"] == int(10 * strength) + (scheduler == "pndm")


def test_strength_trades_the_picture_for_the_prompt():
    """With the trained default model: low strength keeps the starting picture, full strength draws the prompt."""
    from edgesd.models.adherence import read_picture
    from edgesd.models.training.shapes import Scene, render

    source = render(Scene("blue", "red", "circle", "center", "large"), 64)
    default = edgesd.Pipeline.load()
    prompt = "a large green square in the top left corner on a white background"
    near = read_picture(default(prompt, image=source, strength=0.1, seed=1).images[0])
    far = read_picture(default(prompt, image=source, strength=1.0, seed=1).images[0])
    assert (near.background, near.color, near.shape, near.position) == ("blue", "red", "circle", "center")
    assert (far.background, far.color, far.shape, far.position) == ("white", "green", "square", "top left")


def test_image_size_is_the_default_and_can_be_changed(pipe, start_image):
    assert pipe(PROMPT, image=start_image, num_inference_steps=2, seed=1).images[0].size == (64, 64)
    assert pipe(PROMPT, image=start_image, num_inference_steps=2, seed=1, width=128).images[0].size == (128, 64)


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 0.0}, "strength must be in"),
    ({"strength": 1.5}, "strength must be in"),
    ({"strength": 0.04, "num_inference_steps": 20}, "leaves no step to run"),
    ({"image": "picture.png"}, "image must be a PIL image"),
    ({"image": np.zeros((64, 64), np.uint8)}, "image array has shape"),
    ({"image": np.zeros(64, np.uint8)}, "image array has shape"),
    ({"image": np.zeros((64, 64, 3), np.float32)}, "image array has shape .* and dtype float32"),
])
def test_bad_img2img_input(pipe, start_image, kwargs, message):
    kwargs = {"image": start_image, **kwargs}
    with pytest.raises(EdgesdError, match=message):
        pipe(PROMPT, seed=1, **kwargs)


def test_model_without_vae_encoder(tiny_src, tmp_path, start_image):
    from edgesd.export import ExportOptions, export_model

    export_model(tiny_src, tmp_path / "m", ExportOptions(with_vae_encoder=False))
    with pytest.raises(EdgesdError, match="no vae_encoder.*without --no-vae-encoder"):
        edgesd.Pipeline.load(tmp_path / "m")(PROMPT, image=start_image, num_inference_steps=2)
