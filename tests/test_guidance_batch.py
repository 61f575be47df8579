"""RuntimeOptions.guidance_batch: a guided step as one U-Net call of batch 2B (joint) or two of batch B (split).
The pictures are the same; auto splits where the graphs run on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

import edgesd
from edgesd.backends.base import RuntimeOptions
from edgesd.denoiser import Denoiser
from edgesd.errors import EdgesdError

from .commands import edgesd as run_edgesd


class CountingUnet:
    """A stand-in U-Net whose output depends on each sample's own inputs only (as a real one's does)."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, sample, timestep, encoder_hidden_states, text_embeds):
        self.batches.append(sample.shape[0])
        scale = encoder_hidden_states.mean(axis=(1, 2))[:, None, None, None] + text_embeds[:, :1, None, None]
        return (np.tanh(sample) * scale + timestep[:, None, None, None] / 1000).astype(np.float32)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_split_guidance_equals_one_joint_call(rescale):
    rng = np.random.default_rng(0)
    b = 3  # pictures per call
    cond = {"encoder_hidden_states": rng.standard_normal((2 * b, 5, 8), dtype=np.float32),  # [uncond; cond]
            "text_embeds": rng.standard_normal((2 * b, 4), dtype=np.float32)}
    x = rng.standard_normal((b, 4, 6, 6), dtype=np.float32)
    out, calls = {}, {}
    for split in (False, True):
        unet = CountingUnet()
        den = Denoiser(unet=unet, cond=cond, guidance_scale=6.0, prediction_type="epsilon",
                       alphas_cumprod=np.linspace(0.99, 0.01, 1000, dtype=np.float32), guidance_rescale=rescale,
                       guided_down_to=500.0, split_guidance=split)
        out[split] = [den.denoise(x, 2.0, 700.0), den.denoise(x, 1.0, 300.0)]  # guided, then past the cutoff
        calls[split] = unet.batches
    assert calls == {False: [2 * b, b], True: [b, b, b]}
    for joint, split in zip(out[False], out[True]):
        np.testing.assert_allclose(split, joint, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options, split", [
    ({}, True),  # auto, onnxruntime's CPU provider
    ({"provider": "CPUExecutionProvider"}, True),
    ({"provider": "cuda,cpu"}, False),
    ({"provider": "webgpu"}, False),
    ({"backend": "openvino"}, True),  # device CPU
    ({"backend": "openvino", "device": "GPU"}, False),
    ({"backend": "openvino", "device": "AUTO"}, False),
    ({"guidance_batch": "joint"}, False),
    ({"provider": "cuda", "guidance_batch": "split"}, True),
])
def test_auto_splits_where_the_graphs_run_on_the_cpu(options, split):
    options = {"backend": "onnxruntime", **options}
    assert RuntimeOptions(**options).split_guidance() is split


def test_an_unknown_guidance_batch_is_a_clear_error():
    with pytest.raises(EdgesdError, match="unknown guidance_batch 'half'.*joint, split"):
        RuntimeOptions(guidance_batch="half")


def test_joint_and_split_draw_the_same_pictures():
    run = dict(num_inference_steps=3, guidance_scale=7.5, seed=2, num_images_per_prompt=2, scheduler="euler")
    joint = edgesd.Pipeline.load(cache="off", guidance_batch="joint")("a red circle", **run)
    split = edgesd.Pipeline.load(cache="off", guidance_batch="split")("a red circle", **run)
    assert joint.timings["unet_calls"] == 3 and split.timings["unet_calls"] == 6  # U-Net graph runs
    assert joint.timings["unet_evaluations"] == split.timings["unet_evaluations"] == 3
    np.testing.assert_allclose(split.latents, joint.latents, rtol=0, atol=1e-5)


def test_cli_takes_guidance_batch(tmp_path):
    out = tmp_path / "split.png"
    done = run_edgesd("generate", "a red circle", "--steps", 2, "--seed", 1, "--guidance-batch", "split", "-o", out)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    bad = run_edgesd("generate", "a red circle", "--guidance-batch", "half", "-o", tmp_path / "bad.png")
    assert bad.returncode == 2 and "'half' is not one of 'auto', 'joint', 'split'" in bad.stderr
    assert not (tmp_path / "bad.png").exists()
