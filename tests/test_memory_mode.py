"""RuntimeOptions.memory "low": each graph is loaded for its stage only; the pictures are those of "fast"."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import edgesd
from edgesd.errors import Cancelled, EdgesdError

from .commands import edgesd as run_edgesd

RUN = dict(num_inference_steps=3, guidance_scale=1.5, seed=4)


class Watch:
    """Which graphs a pipeline holds whenever one of its graphs runs."""

    def __init__(self, pipe):
        self.pipe, self.seen = pipe, []
        real = edgesd.pipeline.RunContext.run

        def run(ctx, name, feeds, release=True):
            out = real(ctx, name, feeds, release)
            self.seen.append((name, sorted(ctx.pipe.graphs)))  # what is loaded while `name` runs
            return out

        self.real, self.patched = real, run


def test_low_memory_holds_one_component_at_a_time_and_draws_the_same(monkeypatch):
    fast = edgesd.Pipeline.load(cache="off")("a red circle", **RUN)
    pipe = edgesd.Pipeline.load(cache="off", memory="low")
    assert pipe.graphs == {}  # nothing loaded until a stage needs it
    watch = Watch(pipe)
    monkeypatch.setattr(edgesd.pipeline.RunContext, "run", watch.patched)
    low = pipe("a red circle", **RUN)
    assert np.array_equal(np.asarray(low.images[0]), np.asarray(fast.images[0]))
    assert {(name, tuple(held)) for name, held in watch.seen} == {
        ("text_encoder", ("text_encoder",)), ("unet", ("unet",)), ("vae_decoder", ("vae_decoder",))}
    assert pipe.graphs == {}
    again = pipe("a red circle", **RUN)  # loaded again for the next picture
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(fast.images[0]))


def test_low_memory_frees_everything_after_a_cancelled_call():
    pipe = edgesd.Pipeline.load(cache="off", memory="low")
    with pytest.raises(Cancelled):
        pipe("a red circle", callback=lambda step, total: False, **RUN)
    assert pipe.graphs == {}


def test_low_memory_calls_from_two_threads_take_turns():
    pipe = edgesd.Pipeline.load(cache="off", memory="low")
    want = edgesd.Pipeline.load(cache="off")("a red circle", **RUN).images[0]
    got = []
    threads = [threading.Thread(target=lambda: got.append(pipe("a red circle", **RUN).images[0])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and all(np.array_equal(np.asarray(g), np.asarray(want)) for g in got)


def test_memory_option_on_the_command_line_and_a_bad_value(tmp_path):
    out = tmp_path / "low.png"
    run = run_edgesd("generate", "a red circle", "--steps", 2, "--seed", 1, "--memory", "low", "-o", out)
    assert run.returncode == 0, run.stderr
    assert out.is_file()
    with pytest.raises(EdgesdError, match="unknown memory 'tiny'.*fast, low"):
        edgesd.RuntimeOptions(memory="tiny")


def test_low_memory_gives_each_freed_stage_back(monkeypatch):
    given_back = []
    monkeypatch.setattr(edgesd.pipeline, "give_back_freed_memory", lambda: given_back.append(1))
    edgesd.Pipeline.load(cache="off", memory="low")("a red circle", **RUN)
    assert len(given_back) == 3  # after the text encoder, the U-Net and the VAE decoder
    edgesd.Pipeline.load(cache="off")("a red circle", **RUN)
    assert len(given_back) == 3  # "fast" frees nothing


def test_low_memory_keeps_large_blocks_off_the_heap(monkeypatch):
    fixed = []
    monkeypatch.setattr(edgesd.pipeline, "keep_large_blocks_off_heap", lambda: fixed.append(1))
    edgesd.Pipeline.load(cache="off")
    assert fixed == []
    edgesd.Pipeline.load(cache="off", memory="low")
    assert fixed == [1]


def test_heap_settings_call_the_c_library():
    from edgesd import heap

    heap.give_back_freed_memory()
    heap.keep_large_blocks_off_heap()
    if os.uname().sysname == "Linux" and os.confstr("CS_GNU_LIBC_VERSION"):
        assert heap._libc() is not None  # glibc has malloc_trim and mallopt
