"""The embedded default model draws what the prompt asks for (read back by pixel analysis)."""

import pytest

import edgesd
from edgesd.models.adherence import read_picture
from edgesd.models.training import shapes

# Two held-out combinations (never in training), a training one, and the README's prompt.
CASES = [
    ("a large {c} {s} in the top left corner on a {b} background", sorted(shapes.held_out_combos())[0]),
    ("a large {c} {s} in the bottom right corner on a {b} background", sorted(shapes.held_out_combos())[7]),
    ("{b} background, large {c} {s} in the center", ("yellow", "square", "purple")),
    ("a red circle on a blue background", ("red", "circle", "blue")),
]


@pytest.fixture(scope="module")
def pipe():
    return edgesd.Pipeline.load()  # no path: the embedded model


@pytest.mark.parametrize("template, combo", CASES)
def test_default_model_follows_the_prompt(pipe, template, combo):
    color, shape, background = combo
    prompt = template.format(c=color, s=shape, b=background)
    image = pipe(prompt, seed=3).images[0]  # the model's default steps and guidance
    reading = read_picture(image)
    assert (reading.background, reading.color, reading.shape) == (background, color, shape), prompt


def test_default_model_places_the_shape(pipe):
    """Every position for one held-out combination; the evaluation scores 97% on positions, so allow one miss."""
    color, shape, background = sorted(shapes.held_out_combos())[3]
    prompts = [f"a {color} {shape} {shapes.POSITION_PHRASES[p][0]} on a {background} background"
               for p in shapes.POSITIONS]
    images = pipe(prompts, seed=11).images
    right = [read_picture(im).position == p for im, p in zip(images, shapes.POSITIONS)]
    assert sum(right) >= len(right) - 1, list(zip(shapes.POSITIONS, right))


def test_words_the_model_never_saw_are_ignored(pipe):
    image = pipe("a green triangle on a white background, highly detailed, 4k, masterpiece", seed=4).images[0]
    reading = read_picture(image)
    assert (reading.background, reading.color, reading.shape) == ("white", "green", "triangle")


def test_default_model_is_small_and_trained():
    from edgesd.models_path import default_model_path

    folder = default_model_path()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 25e6
    assert pipe_defaults(folder) == (20, 1.5)
    assert (folder / "README.md").is_file()  # the model card


def pipe_defaults(folder):
    from edgesd.model import ModelFolder

    d = ModelFolder.open(folder).defaults
    return d.num_inference_steps, d.guidance_scale
