"""End-to-end parity with diffusers' StableDiffusionPipeline, one test per sampler."""

import numpy as np
import pytest

import edgesd
from edgesd.export.parity import psnr

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# diffusers scheduler class and from_config overrides for each of our names
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "dpm2-a-karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                           "algorithm_type": "sde-dpmsolver++"}),
}
MIN_PSNR_DB = 40.0
PROMPT = "a small red circle on a blue background"


@pytest.fixture(scope="module")
def reference(tiny_src):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_src, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = dict(pipe.scheduler.config)  # each test starts from the model's own
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_onnx):
    return edgesd.Pipeline.load(tiny_onnx)


def _diffusers_run(pipe, scheduler, latents, steps, guidance, seed, output_type):
    cls_name, overrides = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.model_scheduler_config, **overrides)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
               generator=torch.Generator().manual_seed(seed), output_type=output_type)
    return out.images


def _diffusers_image(pipe, scheduler, latents, steps, guidance, seed):
    return _diffusers_run(pipe, scheduler, latents, steps, guidance, seed, "np")[0] * 255


def _diffusers_latents(pipe, scheduler, latents, steps, guidance, seed):
    return _diffusers_run(pipe, scheduler, latents, steps, guidance, seed, "latent").numpy()


def _ours(pipe, scheduler, latents, steps, guidance, seed):
    gen = torch.Generator().manual_seed(seed)  # ancestral noise drawn as diffusers draws it
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                scheduler=scheduler, noise=lambda shape: torch.randn(shape, generator=gen).numpy())


def _our_image(pipe, scheduler, latents, steps, guidance, seed):
    return np.asarray(_ours(pipe, scheduler, latents, steps, guidance, seed).images[0], dtype=np.float64)


def _assert_latents_close(expected, got):
    """Final latents agree to fp32 graph error; a wrong sigma or timestep moves them by 1e-2 or more."""
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("steps", [3, 20])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_image_and_latents_match_diffusers(reference, ours, scheduler, steps):
    latents = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    ours_result = _ours(ours, scheduler, latents, steps, 7.5, seed=5)
    expected = _diffusers_image(reference, scheduler, latents, steps, 7.5, seed=5)
    assert psnr(expected, np.asarray(ours_result.images[0], dtype=np.float64)) >= MIN_PSNR_DB
    _assert_latents_close(_diffusers_latents(reference, scheduler, latents, steps, 7.5, seed=5), ours_result.latents)


@pytest.mark.parametrize("other", ["ddim", "euler-a", "dpm++2m"])
def test_latent_check_tells_samplers_apart(reference, ours, other):
    """The random tiny model's images barely depend on the sampler, so the latents carry the check:
    another sampler must fail it, or the test above proves nothing."""
    latents = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    expected = _diffusers_latents(reference, "euler", latents, 3, 7.5, seed=5)
    with pytest.raises(AssertionError):
        _assert_latents_close(expected, _ours(ours, other, latents, 3, 7.5, seed=5).latents)


def test_no_guidance_matches_diffusers(reference, ours):
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
    expected = _diffusers_image(reference, "euler", latents, 4, 1.0, seed=0)
    assert psnr(expected, _our_image(ours, "euler", latents, 4, 1.0, seed=0)) >= MIN_PSNR_DB


def test_batch_and_negative_prompt_match_diffusers(reference, ours):
    latents = np.random.default_rng(3).standard_normal((2, 4, 16, 16)).astype(np.float32)
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    out = reference(PROMPT, negative_prompt="green", num_images_per_prompt=2, num_inference_steps=4,
                    latents=torch.from_numpy(latents), output_type="np")
    result = ours(PROMPT, negative_prompt="green", num_images_per_prompt=2, num_inference_steps=4,
                  latents=latents, scheduler="ddim")
    for expected, image in zip(out.images, result.images):
        assert psnr(expected * 255, np.asarray(image, dtype=np.float64)) >= MIN_PSNR_DB


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(reference, ours, rescale):
    """guidance_rescale (Lin et al. 2023), as diffusers' StableDiffusionPipeline applies it."""
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.model_scheduler_config)
    expected = reference(PROMPT, num_inference_steps=8, guidance_scale=7.5, guidance_rescale=rescale,
                         latents=torch.from_numpy(latents), output_type="latent").images.numpy()
    got = ours(PROMPT, num_inference_steps=8, guidance_scale=7.5, guidance_rescale=rescale, latents=latents,
               scheduler="euler").latents
    _assert_latents_close(expected, got)


def _guidance_off_after(steps_guided: int):
    """diffusers' dynamic classifier-free guidance (its callback_on_step_end recipe): after step
    `steps_guided - 1` guidance is switched off and only the conditional embeddings are kept."""
    def callback(pipe, i, t, kwargs):
        if i == steps_guided - 1:
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs
    return callback


@pytest.mark.parametrize("scheduler,steps,cutoff,guided", [("euler", 8, 0.4, 4), ("ddim", 10, 0.25, 3),
                                                           ("dpm++2m", 7, 0.5, 4), ("euler-a", 6, 0.99, 6)])
def test_guidance_cutoff_matches_diffusers_dynamic_guidance(reference, ours, scheduler, steps, cutoff, guided):
    """guidance_cutoff guides the first ceil(cutoff x steps) steps and runs the rest at batch B on the
    conditional prompt alone, as diffusers does with its dynamic-guidance callback; two pictures per prompt
    and a negative prompt check that the right half of each stacked input is kept."""
    latents = np.random.default_rng(4).standard_normal((2, 4, 16, 16)).astype(np.float32)
    cls_name, overrides = SCHEDULERS[scheduler]
    reference.scheduler = getattr(diffusers, cls_name).from_config(reference.model_scheduler_config, **overrides)
    gen = torch.Generator().manual_seed(3)
    expected = reference(PROMPT, negative_prompt="green", num_images_per_prompt=2, num_inference_steps=steps,
                         guidance_scale=7.5, latents=torch.from_numpy(latents), generator=gen, output_type="latent",
                         callback_on_step_end=_guidance_off_after(guided),
                         callback_on_step_end_tensor_inputs=["prompt_embeds"]).images.numpy()

    def run(**cutoff_arg):
        noise_gen = torch.Generator().manual_seed(3)  # ancestral noise drawn as diffusers draws it
        return ours(PROMPT, negative_prompt="green", num_images_per_prompt=2, num_inference_steps=steps,
                    guidance_scale=7.5, latents=latents, scheduler=scheduler,
                    noise=lambda shape: torch.randn(shape, generator=noise_gen).numpy(), **cutoff_arg)

    result = run(guidance_cutoff=cutoff)
    _assert_latents_close(expected, result.latents)
    full = run()
    if guided < steps:  # a cutoff that guides fewer steps must change the picture, or the check proves nothing
        with pytest.raises(AssertionError):
            _assert_latents_close(full.latents, result.latents)
    else:
        _assert_latents_close(full.latents, result.latents)


@pytest.mark.parametrize("scheduler", ["euler", "euler-a", "dpm2-a-karras", "dpm++2m-sde-karras", "ddpm", "lcm"])
def test_torch_cpu_noise_reproduces_a_diffusers_seed(reference, ours, scheduler):
    """With no latents given, diffusers draws the initial and every step's noise from the seeded CPU generator;
    `noise_generator="torch-cpu"` draws the same numbers without torch, so the seed alone gives the same picture."""
    cls_name, overrides = SCHEDULERS[scheduler]
    reference.scheduler = getattr(diffusers, cls_name).from_config(reference.model_scheduler_config, **overrides)
    expected = reference(PROMPT, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2,
                         generator=torch.Generator().manual_seed(1234), output_type="latent").images.numpy()
    got = ours(PROMPT, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2, seed=1234,
               scheduler=scheduler, noise_generator="torch-cpu")
    _assert_latents_close(expected, got.latents)
    assert got.parameters["noise_generator"] == "torch-cpu"
    numpy_noise = ours(PROMPT, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2, seed=1234,
                       scheduler=scheduler)
    with pytest.raises(AssertionError):
        _assert_latents_close(expected, numpy_noise.latents)
