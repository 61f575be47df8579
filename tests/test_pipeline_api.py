"""The Python API: arguments, callbacks, cancellation, seeds, latents, foreign (optimum) folders."""

import numpy as np
import pytest

import edgesd
from edgesd.errors import Cancelled, EdgesdError

from .conftest import FIXTURES


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return edgesd.Pipeline.load(tiny_onnx)


def test_progress_callback_and_cancel(pipe):
    seen = []
    pipe("x", num_inference_steps=4, seed=0, scheduler="euler", callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    seen.clear()  # PLMS calls the U-Net once more than the step count, and reports each call
    pipe("x", num_inference_steps=4, seed=0, scheduler="pndm", callback=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (5, 5)
    with pytest.raises(Cancelled, match="after step 2 of 4"):
        pipe("x", num_inference_steps=4, seed=0, scheduler="euler", callback=lambda i, n: i < 2)


def test_seed_reproduces_and_differs(pipe):
    a = pipe("x", num_inference_steps=2, seed=3).latents
    b = pipe("x", num_inference_steps=2, seed=3).latents
    c = pipe("x", num_inference_steps=2, seed=4).latents
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_prompt_changes_the_result(pipe):
    a = pipe("a red circle", num_inference_steps=2, seed=3).latents
    b = pipe("a green square", num_inference_steps=2, seed=3).latents
    assert np.abs(a - b).max() > 1e-4


def test_batch_shapes(pipe):
    result = pipe(["a", "b"], num_images_per_prompt=2, num_inference_steps=2, seed=1, width=40, height=24)
    assert len(result.images) == 4 and result.images[0].size == (40, 24)
    assert result.latents.shape == (4, 4, 12, 20)


@pytest.mark.parametrize("kwargs, needle", [
    ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents have shape"),
    ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
    ({"num_inference_steps": 0}, "steps must be between"),
    ({"guidance_scale": float("nan")}, "guidance scale"),
    ({"num_images_per_prompt": 0}, "images per prompt"),
    ({"eta": 1.5}, "eta must be between 0 and 1"),
    ({"eta": "0.5"}, "eta must be a number"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"width": 0}, "width 0 is not a positive multiple"),
    ({"width": "64"}, "width '64' is not a positive multiple"),
    ({"guidance_scale": "7"}, "guidance scale must be >= 0"),
    ({"scheduler": 5}, "scheduler must be a name or a diffusers config dict"),
    ({"latents": "abc"}, "latents must be a floating-point NumPy array"),
    ({"callback": 5}, "callback must be a function"),
    ({"negative_prompt": 5}, "negative_prompt must be a string"),
    ({"noise_generator": "cuda"}, "unknown noise generator 'cuda'"),
    ({"scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler"}}, "FlowMatchEulerDiscreteScheduler"),
    ({"scheduler": {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}}, "solver_order=4 is not supported"),
    ({"scheduler": {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3,
                    "algorithm_type": "sde-dpmsolver++"}}, "no third-order SDE update"),
])
def test_bad_arguments(pipe, kwargs, needle):
    with pytest.raises(EdgesdError, match=needle):
        pipe("x", **kwargs)


def test_scheduler_from_diffusers_config_dict(pipe):
    config = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    by_dict = pipe("x", num_inference_steps=3, seed=2, scheduler=config).latents
    by_name = pipe("x", num_inference_steps=3, seed=2, scheduler="euler").latents
    assert np.abs(by_dict - by_name).max() > 1e-4  # spacing changed: leading (model config) vs trailing


def test_optimum_folder_matches_our_export_of_the_same_checkpoint(tmp_path):
    """optimum's layout (int64 ids, scalar timestep, no manifest) runs, and agrees with our export."""
    pytest.importorskip("torch")
    from edgesd.export import ExportOptions, export_model

    ours_dir = tmp_path / "ours"
    export_model(FIXTURES / "sd-micro-transformers4", ours_dir, ExportOptions(with_vae_encoder=False))
    optimum = edgesd.Pipeline.load(FIXTURES / "optimum-onnx-micro")
    assert optimum.folder.manifest is None
    ours = edgesd.Pipeline.load(ours_dir)
    assert optimum.constants == ours.constants
    a = optimum("a red circle", num_inference_steps=3, seed=9, scheduler="dpm++2m").latents
    b = ours("a red circle", num_inference_steps=3, seed=9, scheduler="dpm++2m").latents
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_long_prompt_is_reported(pipe):
    assert pipe("a red circle", num_inference_steps=1, seed=0).warnings == []
    warnings = pipe("red " * 80, num_inference_steps=1, seed=0).warnings
    assert len(warnings) == 1 and "first 75 tokens (80 given)" in warnings[0]


def test_generation_request_runs_and_is_recorded(pipe):
    """pipe(...) builds a frozen GenerationRequest, checked once; pipe.run(request) gives the same pictures."""
    from dataclasses import FrozenInstanceError

    request = edgesd.GenerationRequest.build(pipe.folder, pipe.family, "a red circle", num_inference_steps=2,
                                             seed=5, scheduler="euler")
    with pytest.raises(FrozenInstanceError):
        request.steps = 3
    by_run = pipe.run(request)
    by_call = pipe("a red circle", num_inference_steps=2, seed=5, scheduler="euler")
    np.testing.assert_array_equal(by_run.latents, by_call.latents)
    assert by_call.request == request and by_call.parameters == by_run.parameters
    assert by_call.parameters["steps"] == 2 and by_call.parameters["scheduler"] == "euler"


def test_unknown_argument_is_an_edgesd_error(pipe):
    with pytest.raises(EdgesdError, match="unexpected keyword argument 'num_steps'"):
        pipe("x", num_steps=3)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "ddpm"])
def test_steps_past_the_last_timestep_are_a_clear_error(scheduler):
    """SD's leading spacing with steps_offset 1 reaches timestep 1000 at 1000 steps: alpha-space samplers say so."""
    pipe = edgesd.Pipeline.load()
    with pytest.raises(EdgesdError, match="1000 steps of .* reach timestep 1000.*at most 999"):
        pipe("x", num_inference_steps=1000, scheduler=scheduler)
    with pytest.raises(edgesd.Cancelled):  # 999 runs (cancelled at once to keep the test short)
        pipe("x", num_inference_steps=999, scheduler=scheduler, callback=lambda i, n: False)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_images_per_prompt=1_000_000_000), "above the limit of 16,777,216"),
    (dict(width=8192, height=8192, num_images_per_prompt=2), "raise the limit"),
    (dict(max_pixels=0), "max_pixels must be a positive"),
    (dict(prompt="a\udc80b"), "not valid Unicode"),
    (dict(negative_prompt="\ud800"), "not valid Unicode"),
    (dict(latents=np.full((1, 4, 16, 16), np.nan, np.float32)), "latents hold NaN"),
])
def test_limits_and_invalid_text_are_caught_before_any_work(kwargs, needle):
    pipe = edgesd.Pipeline.load()
    args = {"prompt": "x", "num_inference_steps": 2, **kwargs}
    with pytest.raises(EdgesdError, match=needle):
        pipe(**args)


def test_a_graph_returning_nan_is_named_not_a_black_picture():
    class NanGraph:
        def __init__(self, graph):
            self.spec, self.path = graph.spec, graph.path

        def run(self, feeds, local=None, release=False):
            return {"sample": np.full((1, 3, 64, 64), np.nan, np.float32)}

    pipe = edgesd.Pipeline.load()
    pipe.graphs["vae_decoder"] = NanGraph(pipe.graphs["vae_decoder"])  # a broken export's decoder
    with pytest.raises(EdgesdError, match="the vae_decoder graph returned NaN or infinite values"):
        pipe("x", num_inference_steps=2, seed=1)
    assert edgesd.Pipeline.load()("x", num_inference_steps=1, max_pixels=64 * 64).images[0].size == (64, 64)


def test_a_unet_of_the_wrong_shape_is_named():
    class ScalarGraph:
        def __init__(self, graph):
            self.spec, self.path = graph.spec, graph.path

        def run(self, feeds, local=None, release=False):
            return {"out_sample": np.zeros((), np.float32)}

    pipe = edgesd.Pipeline.load()
    pipe.graphs["unet"] = ScalarGraph(pipe.graphs["unet"])
    with pytest.raises(EdgesdError, match=r"the unet graph returned shape \(\) for a sample of shape"):
        pipe("x", num_inference_steps=2, seed=1)


class _ReleaseRecorder:
    """A graph that records each run's `release` (its stage of the picture ends there) and runs the real one."""

    def __init__(self, graph, seen: list):
        self.graph, self.seen = graph, seen

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def run(self, feeds, local=None, release=False):
        self.seen.append(release)
        return self.graph.run(feeds, local, release)


@pytest.mark.parametrize("scheduler, split, want", [
    ("euler", False, [False, False, False, True]),
    # Heun's second evaluation of the step before the last is at the last step's timestep: released early
    ("heun", False, [False, False, False, True, True]),
    ("euler", True, [False] * 6 + [True, True]),  # split guidance: both halves of the last step
    ("ddim", False, [False, False, False, True]),
])
def test_the_unet_releases_its_memory_after_the_last_step_and_the_others_after_each_run(scheduler, split, want):
    loaded = edgesd.Pipeline.load(options=edgesd.RuntimeOptions(guidance_batch="split" if split else "joint"))
    unet, others = [], []
    for name in list(loaded.graphs):
        loaded.graphs[name] = _ReleaseRecorder(loaded.graphs[name], unet if name == "unet" else others)
    loaded("x", num_inference_steps=4 if scheduler != "heun" else 3, seed=1, scheduler=scheduler)
    assert unet == want
    assert others and all(others)  # the text encoder's run and the VAE decode end their stages


def test_openvino_errors_keep_their_reason():
    from edgesd.backends.openvino_backend import _first_reason

    trace = ("Exception from src/inference/src/cpp/core.cpp:84:\nCheck 'util::file_exists(path)' failed at "
             "src/frontends/common/src/frontend.cpp:117:\nFrontEnd API failed with GeneralFailure:\n"
             "onnx: Could not open the file: \"/x/model.onnx\"\n\n")
    assert _first_reason(RuntimeError(trace)) == 'onnx: Could not open the file: "/x/model.onnx"'
