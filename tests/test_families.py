"""Model families (SD 2.x, SD-Turbo, LCM, inpainting, SDXL, SDXL-Turbo) against diffusers' own pipelines.

Each family is a tiny random model built here, exported by `export_model`, and run by diffusers' pipeline and
ours with the same latents and step noise: image PSNR >= 40 dB and the same final latents.
"""

import threading

import numpy as np
import pytest
from PIL import Image

import edgesd
from edgesd.errors import EdgesdError
from edgesd.export.parity import psnr

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle!! on a blue background"
MIN_PSNR_DB = 40.0
SIZE = 64


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """kind -> (diffusers folder, our export), built once per kind."""
    from edgesd.export import export_model
    from edgesd.export.tiny import build_random_family

    built = {}

    def get(kind):
        if kind not in built:
            root = tmp_path_factory.mktemp(kind)
            src = build_random_family(root / "src", kind)
            export_model(src, root / "onnx")
            built[kind] = (src, root / "onnx")
        return built[kind]
    return get


def _reference(src, kind):
    if kind == "sdxl-inpaint":
        pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(src, add_watermarker=False)
    elif kind.startswith("sdxl"):
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, add_watermarker=False)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(src, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(seed=0, channels=4, size=SIZE // 2):
    return np.random.default_rng(seed).standard_normal((1, channels, size, size)).astype(np.float32)


def _both(ref, ours, ref_kwargs=None, ours_kwargs=None, ref_draws_latents=False, **kwargs):
    """(diffusers image, diffusers latents, our result) for the same arguments, latents and step noise.

    `ref_draws_latents`: diffusers draws the initial noise from the generator (the same `latents` ours gets):
    its inpainting pipeline ignores `strength` for latents passed in."""
    latents = kwargs.pop("latents")
    common = dict(height=SIZE, width=SIZE, **kwargs)
    out = {}
    for output_type in ("np", "latent"):
        gen = torch.Generator().manual_seed(3)
        given = {} if ref_draws_latents else {"latents": torch.from_numpy(latents)}
        out[output_type] = ref(generator=gen, output_type=output_type, **given, **common,
                               **(ref_kwargs or {})).images
    gen = torch.Generator().manual_seed(3)
    result = ours(latents=latents, noise=lambda shape: torch.randn(shape, generator=gen).numpy(), **common,
                  **(ours_kwargs or {}))
    return out["np"][0] * 255, out["latent"].numpy(), result


def _assert_equal(image, latents, result):
    assert psnr(image, np.asarray(result.images[0], np.float64)) >= MIN_PSNR_DB
    np.testing.assert_allclose(result.latents, latents, atol=1e-4 * np.abs(latents).max())


CASES = {  # kind -> (family, generation arguments): each family's own kind of use
    "sd2": ("sd", dict(num_inference_steps=8, guidance_scale=5.0)),
    "turbo": ("sd", dict(num_inference_steps=1, guidance_scale=0.0)),
    "lcm": ("lcm", dict(num_inference_steps=4, guidance_scale=8.5)),
    "sdxl": ("sdxl", dict(num_inference_steps=8, guidance_scale=5.0)),
    "sdxl-turbo": ("sdxl", dict(num_inference_steps=1, guidance_scale=0.0)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_family_equals_diffusers(family_model, kind):
    src, onnx = family_model(kind)
    ours = edgesd.Pipeline.load(onnx)
    family, kwargs = CASES[kind]
    assert ours.family.name == family
    image, latents, result = _both(_reference(src, kind), ours, prompt=PROMPT, latents=_latents(), **kwargs)
    _assert_equal(image, latents, result)
    if kind == "lcm":  # one evaluation per step, no unconditional batch
        assert result.timings["unet_evaluations"] == 4


@pytest.mark.parametrize("kind", ["sd2", "lcm", "inpaint", "sdxl"])
def test_every_graph_runs_its_description_sample_inputs(family_model, kind):
    """The family's graph descriptions (names, dims, sample inputs) fit the graphs its export wrote."""
    _, onnx = family_model(kind)
    pipe = edgesd.Pipeline.load(onnx)
    for component, spec in pipe.specs.items():
        if not pipe.folder.has(component):  # DeepCache's shallow U-Net: `edgesd deepcache` adds it (test_deepcache)
            continue
        feeds = spec.sample_inputs(pipe.family.sample_sizes(component, pipe.folder.configs, 16))
        out = pipe.graph(component).run(feeds)
        assert set(out) == set(spec.output_names)
        assert all(out[t.name].ndim == len(t.dims) for t in spec.outputs)


def test_lcm_guidance_goes_in_through_its_embedding(family_model):
    """LCM's guidance scale changes the picture without an unconditional branch (w = scale - 1)."""
    _, onnx = family_model("lcm")
    ours = edgesd.Pipeline.load(onnx)
    a = ours(PROMPT, num_inference_steps=2, guidance_scale=8.5, seed=1).latents
    b = ours(PROMPT, num_inference_steps=2, guidance_scale=2.0, seed=1).latents
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    assert ours.defaults.num_inference_steps == 4 and ours.defaults.guidance_scale == 8.5


@pytest.mark.parametrize("negative, prompt_2", [(None, None), ("blurry", "a photo"), ("", None)])
def test_sdxl_prompts_and_negatives_equal_diffusers(family_model, negative, prompt_2):
    """force_zeros_for_empty_prompt (no negative given), a negative prompt, a second prompt."""
    src, onnx = family_model("sdxl")
    image, latents, result = _both(_reference(src, "sdxl"), edgesd.Pipeline.load(onnx), prompt=PROMPT,
                                   negative_prompt=negative, prompt_2=prompt_2, latents=_latents(1),
                                   num_inference_steps=4, guidance_scale=6.0)
    _assert_equal(image, latents, result)


def test_sdxl_micro_conditioning_equals_diffusers(family_model):
    src, onnx = family_model("sdxl")
    ours = edgesd.Pipeline.load(onnx)
    sizes = dict(original_size=(256, 128), crops_coords_top_left=(8, 16), target_size=(64, 64))
    image, latents, result = _both(_reference(src, "sdxl"), ours, prompt=PROMPT, latents=_latents(2),
                                   num_inference_steps=4, guidance_scale=5.0, **sizes)
    _assert_equal(image, latents, result)
    plain = ours(PROMPT, latents=_latents(2), num_inference_steps=4, guidance_scale=5.0, width=SIZE, height=SIZE).latents
    assert np.abs(plain - result.latents).max() > 1e-4 * np.abs(plain).max()  # the time ids reached the U-Net


@pytest.fixture(scope="module")
def picture_and_mask():
    picture = np.zeros((SIZE, SIZE, 3), np.uint8)
    picture[:] = (30, 70, 220)
    picture[16:48, 16:48] = (220, 30, 30)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 20:60] = 255
    return Image.fromarray(picture), Image.fromarray(mask)


def _inpaint_reference_inputs(ours, picture, mask):
    """Our clean and masked-picture latents, given to diffusers as latents (it samples the VAE posterior,
    we take its mean)."""
    from edgesd.images import from_pil, mask_from_picture
    from edgesd.pipeline import RunContext

    x0 = ours.encode_image(picture, SIZE, SIZE)
    keep = mask_from_picture(mask, SIZE, SIZE) < 0.5
    masked = ours._encode_pixels((from_pil(picture, SIZE, SIZE) * keep).astype(np.float32), RunContext(ours))
    return dict(image=torch.from_numpy(x0), mask_image=mask, masked_image_latents=torch.from_numpy(masked))


@pytest.mark.parametrize("kind, scheduler, cls, strength", [
    ("inpaint", "ddim", "DDIMScheduler", 1.0), ("inpaint", "euler", "EulerDiscreteScheduler", 1.0),
    ("inpaint", "dpm++2m", "DPMSolverMultistepScheduler", 0.6),
    ("sdxl-inpaint", "euler", "EulerDiscreteScheduler", 1.0),
    ("sdxl-inpaint", "dpm++2m", "DPMSolverMultistepScheduler", 0.6),
])
def test_inpainting_unet_equals_diffusers(family_model, picture_and_mask, kind, scheduler, cls, strength):
    """The 9-channel U-Net (mask + masked-picture latents): StableDiffusionInpaintPipeline and
    StableDiffusionXLInpaintPipeline."""
    src, onnx = family_model(kind)
    ours = edgesd.Pipeline.load(onnx)
    assert ours.family.name == {"inpaint": "sd-inpaint", "sdxl-inpaint": "sdxl-inpaint"}[kind]
    ref = _reference(src, kind)
    ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config)
    picture, mask = picture_and_mask
    drawn = strength < 1  # diffusers noises the picture only for latents it draws itself
    start = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(3)).numpy()
    image, latents, result = _both(ref, ours, _inpaint_reference_inputs(ours, picture, mask),
                                   dict(image=picture, mask_image=mask, scheduler=scheduler), drawn, prompt=PROMPT,
                                   strength=strength, latents=start if drawn else _latents(), num_inference_steps=10,
                                   guidance_scale=5.0)
    _assert_equal(image, latents, result)
    assert result.parameters["inpainting"] and result.parameters["strength"] == strength


@pytest.mark.parametrize("scheduler, cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"),
                                            ("dpm++2m", "DPMSolverMultistepScheduler")])
def test_ordinary_model_inpaints_by_latent_blending(tiny_src, tiny_onnx, picture_and_mask, scheduler, cls):
    """A 4-channel model with a mask: diffusers' blend of the noised picture outside the mask after each step."""
    ours = edgesd.Pipeline.load(tiny_onnx)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tiny_src, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config)
    picture, mask = picture_and_mask
    image, latents, result = _both(ref, ours, _inpaint_reference_inputs(ours, picture, mask),
                                   dict(image=picture, mask_image=mask, scheduler=scheduler), prompt=PROMPT,
                                   latents=_latents(), num_inference_steps=10, guidance_scale=5.0)
    _assert_equal(image, latents, result)
    # outside the mask the picture stays; inside it is repainted
    out = np.asarray(result.images[0], np.float64)
    keep = np.asarray(mask) < 128
    assert psnr(np.asarray(picture, np.float64)[keep], out[keep]) > psnr(np.asarray(picture, np.float64)[~keep],
                                                                          out[~keep])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_two_threads_on_one_pipeline_equal_sequential_calls(tiny_onnx, backend):
    """Each call keeps its state in its own run context (OpenVINO: its own infer requests, sizes differing)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    pipe = edgesd.Pipeline.load(tiny_onnx, backend=backend)
    args = [dict(prompt="a red circle", seed=1, num_inference_steps=4, scheduler="euler-a"),
            dict(prompt="a blue square", seed=2, num_inference_steps=4, width=96, scheduler="dpm++2m")]
    sequential = [pipe(**a) for a in args]
    threaded = [None, None]

    def work(i):
        threaded[i] = pipe(**args[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, par in zip(sequential, threaded):
        np.testing.assert_array_equal(seq.latents, par.latents)
        assert par.timings["unet_calls"] == seq.timings["unet_calls"]


# --- bad input ---------------------------------------------------------------------------------------------

def _folder_with(tmp_path, model_index: dict, unet: dict | None = None):
    import json
    import shutil
    from pathlib import Path

    root = tmp_path / "m"
    shutil.copytree(Path(__file__).parent / "fixtures" / "optimum-onnx-micro", root)
    (root / "model_index.json").write_text(json.dumps(model_index))
    if unet is not None:
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


@pytest.mark.parametrize("index, unet, needle", [
    ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}, None,
     "SD3"),
    ({"_class_name": "FluxPipeline"}, None, "Flux"),
    ({"_class_name": "StableDiffusionUpscalePipeline"}, None, "upscaler"),
    ({"_class_name": "StableUnCLIPPipeline"}, None, "unCLIP"),
    ({"_class_name": "StableDiffusionPipeline"}, {"in_channels": 7, "out_channels": 4}, "7 input channels"),
    ({"_class_name": "StableDiffusionPipeline"}, {"class_embed_type": "timestep"}, "conditioning edgesd does not"),
])
def test_unsupported_families_are_named(tmp_path, index, unet, needle):
    root = _folder_with(tmp_path, index, unet)
    with pytest.raises(EdgesdError, match=needle):
        edgesd.Pipeline.load(root)


def test_unsupported_family_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from edgesd.cli import main

    root = _folder_with(tmp_path, {"_class_name": "FluxPipeline"})
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(root), "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 2 and "Flux" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a.png").exists()


def test_bad_family_arguments(tiny_onnx, family_model, picture_and_mask):
    picture, mask = picture_and_mask
    sd = edgesd.Pipeline.load(tiny_onnx)
    with pytest.raises(EdgesdError, match="prompt_2 .* second text encoder"):
        sd("x", prompt_2="y", num_inference_steps=1)
    with pytest.raises(EdgesdError, match="mask_image needs image"):
        sd("x", mask_image=mask, num_inference_steps=1)
    with pytest.raises(EdgesdError, match="mask_image is 32x32 but image is 64x64"):
        sd("x", image=picture, mask_image=mask.resize((32, 32)), num_inference_steps=1)
    with pytest.raises(EdgesdError, match="mask_image array has shape"):
        sd("x", image=picture, mask_image=np.zeros((64, 64), np.float32), num_inference_steps=1)
    inpaint = edgesd.Pipeline.load(family_model("inpaint")[1])
    with pytest.raises(EdgesdError, match="inpainting model: it needs image and mask_image"):
        inpaint("x", num_inference_steps=1)


def test_cli_mask_prompt_2_and_info(family_model, picture_and_mask, tmp_path):
    import json

    from click.testing import CliRunner

    from edgesd.cli import main

    picture, mask = picture_and_mask
    picture.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    runner = CliRunner()
    inpaint = family_model("inpaint")[1]
    out = tmp_path / "o.png"
    r = runner.invoke(main, ["generate", "x", "--model", str(inpaint), "--image", str(tmp_path / "p.png"),
                             "--mask", str(tmp_path / "m.png"), "--steps", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(Image.open(out).text["edgesd"])["inpainting"] is True
    sdxl = family_model("sdxl")[1]
    r = runner.invoke(main, ["generate", "x", "--model", str(sdxl), "--prompt-2", "y", "--negative-2", "z",
                             "--steps", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(Image.open(out).text["edgesd"])["prompt_2"] == "y"
    r = runner.invoke(main, ["generate", "x", "--model", str(inpaint), "--mask", str(tmp_path / "m.png"),
                             "-o", str(tmp_path / "n.png")])
    assert r.exit_code == 2 and "mask_image needs image" in r.output
    r = runner.invoke(main, ["info", str(sdxl)])
    assert r.exit_code == 0 and "SDXL" in r.output and "text_encoder_2" in r.output


@pytest.mark.parametrize("kind, recipe", [("sdxl", "int8-weights"), ("lcm", "int8"), ("inpaint", "int8-weights")])
def test_family_recipes_pass_their_fidelity_gates(family_model, tmp_path, kind, recipe):
    from edgesd.export import ExportOptions, export_model

    src, _ = family_model(kind)
    report = export_model(src, tmp_path / "q", ExportOptions(recipe=recipe))
    assert report.fidelity.passed and report.fidelity.image_psnr_db
    pipe = edgesd.Pipeline.load(tmp_path / "q")
    assert pipe.family.name == CASES.get(kind, ("sd-inpaint",))[0]


@pytest.mark.parametrize("scheduler, cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")])
def test_sdxl_img2img_equals_diffusers(family_model, picture_and_mask, scheduler, cls):
    """StableDiffusionXLImg2ImgPipeline given our clean latents, and the same noise."""
    src, onnx = family_model("sdxl")
    ours = edgesd.Pipeline.load(onnx)
    picture, _ = picture_and_mask
    x0 = ours.encode_image(picture, SIZE, SIZE)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(src, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config)
    want = ref(PROMPT, image=torch.from_numpy(x0), strength=0.6, num_inference_steps=10, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(7), output_type="np").images[0] * 255
    got = ours(PROMPT, image=picture, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
               latents=noise.numpy(), scheduler=scheduler)
    assert psnr(want, np.asarray(got.images[0], np.float64)) >= MIN_PSNR_DB
    assert got.timings["unet_evaluations"] == 6


@pytest.mark.parametrize("kind", ["sdxl", "lcm"])
def test_optimum_family_folders_match_our_export(tmp_path, kind):
    """optimum-cli's SDXL (text_encoder_2/, text_embeds, time_ids, hidden_states.N) and LCM (timestep_cond)
    exports run, and agree with our export of the same checkpoint."""
    import shutil
    from pathlib import Path

    from edgesd.export import ExportOptions, export_model
    from edgesd.tokenizer import ClipTokenizer, packaged_vocab

    fixtures = Path(__file__).parent / "fixtures"
    folders = {}
    for name in (f"{kind}-micro", f"optimum-onnx-{kind}-micro"):  # the tokenizers are left out of the fixtures
        folders[name] = tmp_path / name
        shutil.copytree(fixtures / name, folders[name])
        for tokenizer, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
            if tokenizer == "tokenizer" or kind == "sdxl":
                ClipTokenizer(*packaged_vocab(), pad_token=pad).write_folder(folders[name] / tokenizer)
    export_model(folders[f"{kind}-micro"], tmp_path / "ours", ExportOptions(with_vae_encoder=False))
    optimum = edgesd.Pipeline.load(folders[f"optimum-onnx-{kind}-micro"])
    ours = edgesd.Pipeline.load(tmp_path / "ours")
    assert optimum.folder.manifest is None and optimum.family.name == ours.family.name == kind
    args = dict(num_inference_steps=3, seed=9, width=SIZE, height=SIZE, negative_prompt="blurry")
    a, b = optimum("a red circle!", **args).latents, ours("a red circle!", **args).latents
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("kind", ["sdxl", "lcm", "inpaint"])
def test_family_ir_export_runs_on_openvino_like_onnx_runtime(family_model, picture_and_mask, tmp_path, kind):
    from edgesd.export import ExportOptions, export_model

    pytest.importorskip("openvino")
    src, onnx = family_model(kind)
    export_model(src, tmp_path / "ir", ExportOptions(format="openvino"))
    extra = dict(zip(("image", "mask_image"), picture_and_mask)) if kind == "inpaint" else {}
    args = dict(num_inference_steps=3, seed=4, width=SIZE, height=SIZE, **extra)
    ov = edgesd.Pipeline.load(tmp_path / "ir")
    assert ov.options.backend == "openvino" and ov.family.name == edgesd.Pipeline.load(onnx).family.name
    a, b = ov(PROMPT, **args).latents, edgesd.Pipeline.load(onnx)(PROMPT, **args).latents
    np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max())


def test_export_refuses_a_family_it_does_not_run(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from edgesd.export import export_model

    src = tmp_path / "flux"
    shutil.copytree(Path(__file__).parent / "fixtures" / "sd-micro-transformers4", src)
    (src / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                      "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(EdgesdError, match="Flux .*which edgesd does not run"):
        export_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
