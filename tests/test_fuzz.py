"""Fuzzing the API and the command line (a bounded number of cases, in CI): every outcome is pictures or an
EdgesdError / exit code 2 with one error line, never another exception; and a 30-picture soak keeps memory flat."""

from __future__ import annotations

import numpy as np
import pytest

import edgesd
from edgesd.errors import EdgesdError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=4), st.just([]), st.just({}))
SIZES = st.one_of(st.sampled_from([16, 32, 48, 64]), ANY_SCALAR)
TEXTS = st.one_of(st.text(alphabet=st.characters(codec=None, categories=("L", "N", "P", "Z", "Cs", "Cc")),
                          max_size=30), ANY_SCALAR, st.lists(st.text(max_size=5), max_size=3))
SCHEDULERS = st.one_of(st.none(), st.sampled_from(["euler", "ddim", "dpm++2m-karras", "lcm", "Euler a", "bogus"]),
                       st.just({"_class_name": "EulerDiscreteScheduler"}), st.just({"_class_name": "Nope"}), ANY_SCALAR)


@pytest.fixture(scope="module")
def pipe():
    return edgesd.Pipeline.load()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXTS, negative=TEXTS, steps=st.one_of(st.integers(-1, 3), ANY_SCALAR), guidance=ANY_SCALAR,
       width=SIZES, height=SIZES, seed=st.one_of(st.integers(-2, 2**64), ANY_SCALAR), scheduler=SCHEDULERS,
       count=st.one_of(st.integers(0, 2), ANY_SCALAR), eta=ANY_SCALAR, strength=ANY_SCALAR,
       latents=st.one_of(st.none(), st.just(np.zeros((1, 4, 16, 16), np.float32)), st.just("abc"),
                         st.just(np.zeros((2, 3), np.int64))))
def test_the_api_gives_pictures_or_a_clear_error(pipe, prompt, negative, steps, guidance, width, height, seed,
                                                  scheduler, count, eta, strength, latents):
    args = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                width=width, height=height, seed=seed, scheduler=scheduler, num_images_per_prompt=count, eta=eta,
                latents=latents)
    if strength is not None:
        args.update(strength=strength, image=np.zeros((64, 64, 3), np.uint8))
    try:
        result = pipe(**args)
    except EdgesdError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert result.images and all(image.size == (result.parameters["width"], result.parameters["height"])
                                 for image in result.images)


@settings(max_examples=25, deadline=None)
@given(options=st.lists(st.tuples(st.sampled_from(["--steps", "--guidance", "--seed", "--width", "--height",
                                                   "--scheduler", "--count", "--eta", "--noise", "--vae-tiling",
                                                   "--strength", "--max-pixels"]),
                                  st.one_of(st.text(max_size=6), st.integers(-5, 100).map(str))), max_size=4),
       prompt=st.text(max_size=12))
def test_the_command_line_exits_0_or_2_with_one_error_line(tmp_path_factory, options, prompt):
    from click.testing import CliRunner

    from edgesd.cli import main

    out = tmp_path_factory.mktemp("fuzz") / "a.png"
    args = ["generate", prompt or "x", "-o", str(out)] + [item for pair in options for item in pair]
    if "--steps" not in args:
        args += ["--steps", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 2), (args, result.output, result.exception)
    written = [p for p in out.parent.iterdir() if p.suffix == ".png"]  # a.png, or a-1.png ... with --count
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith(("error:", "Error:"))]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output  # ours, or click's usage one
        assert not written
    else:
        assert written


def test_thirty_pictures_keep_memory_flat(pipe):
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    for i in range(5):  # warm-up: first-call allocations, caches
        pipe("a red circle on a blue background", seed=i, num_inference_steps=4)
    before = process.memory_info().rss
    for i in range(30):
        pipe("a green square on a white background", seed=100 + i, num_inference_steps=4)
    growth_mb = (process.memory_info().rss - before) / 1e6
    assert growth_mb < 40, f"RSS grew {growth_mb:.0f} MB over 30 pictures"
