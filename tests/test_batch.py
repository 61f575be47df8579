"""`edgesd batch`: rows read and checked before any work, pictures equal to the Pipeline's, resumable runs
(rows already written skipped, half-written files never counted), a process pool and a local Ray cluster
(a head and a worker on loopback) making the same pictures as the run in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import edgesd
from edgesd.batch import BatchJob, read_rows, run_batch
from edgesd.cli import main
from edgesd.errors import EdgesdError

ROWS = [
    {"prompt": "a red circle", "steps": 4},
    {"prompt": "a blue square", "negative": "red", "seed": 5, "sampler": "Euler a", "steps": 3},
    {"prompt": "a green triangle", "name": "triangle", "size": "64x64", "guidance": 3, "steps": 2},
]


def _write(path: Path, rows: list[dict], blank_line_after: int | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def pipe():
    return edgesd.Pipeline.load()


def test_rows_take_generates_names_and_default_seeds(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [*ROWS, {"prompt": "x", "num_inference_steps": 2, "scheduler": "ddim",
                                                    "negative_prompt": "y", "guidance_scale": 1.5}],
                     blank_line_after=1)
    rows = read_rows(prompts, base_seed=100)
    assert [r.line for r in rows] == [1, 3, 4, 5]  # a blank line is skipped but counted
    assert [r.filename for r in rows] == ["00001.png", "00003.png", "triangle.png", "00005.png"]
    assert rows[0].arguments == {"prompt": "a red circle", "num_inference_steps": 4, "seed": 100}
    assert rows[1].arguments["seed"] == 5 and rows[1].arguments["scheduler"] == "Euler a"
    assert rows[2].arguments["width"] == rows[2].arguments["height"] == 64
    assert rows[2].arguments["guidance_scale"] == 3.0
    assert rows[3].arguments == {"prompt": "x", "num_inference_steps": 2, "scheduler": "ddim",
                                 "negative_prompt": "y", "guidance_scale": 1.5, "seed": 104}


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "a", "stepz": 3}', "unknown key 'stepz'"),
    ('{"steps": 3}', "no prompt"),
    ('["a"]', "not an object"),
    ('{"prompt": "a",', "not JSON"),
    ('{"prompt": "a", "steps": "many"}', "steps is 'many', not a int"),
    ('{"prompt": "a", "steps": true}', "not a int"),
    ('{"prompt": "a", "guidance": NaN}', "not a finite number"),
    ('{"prompt": "a", "size": "big"}', "not WIDTHxHEIGHT"),
    ('{"prompt": "a", "size": "64x64", "width": 64}', "size and width/height are both given"),
    ('{"prompt": "a", "name": "../x"}', "not a plain file name"),
    ('{"prompt": "a", "name": "00001"}', "also line 1"),
    ('{"prompt": "a", "width": 60}', "line 2: "),  # checked against the model: not a multiple of its size step
    ('{"prompt": "a", "steps": 0}', "steps must be between"),
    ('{"prompt": "a", "sampler": "nope"}', "nope"),
    ('{"prompt": "a", "image": "missing.png"}', "does not exist"),
    ('{"prompt": "a", "mask": "m.png"}', "mask needs image"),
])
def test_a_bad_row_is_one_line_naming_it_and_nothing_is_made(tmp_path, line, needle):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(EdgesdError) as error:
        run_batch(prompts, out, BatchJob())
    assert needle in str(error.value) and "\n" not in str(error.value)
    assert "line 2" in str(error.value) or "also line 1" in str(error.value)
    assert not out.exists()


def test_pictures_equal_the_pipelines_and_a_run_resumes(tmp_path, pipe):
    prompts = _write(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "out"
    progress = []
    report = run_batch(prompts, out, BatchJob(), on_row=lambda done, total: progress.append((done, total)))
    assert (report.written, report.skipped, report.failed) == (3, 0, [])
    assert progress == [(0, 3), (1, 3), (2, 3), (3, 3)]
    expected = {"00001.png": pipe("a red circle", num_inference_steps=4, seed=0),
                "00002.png": pipe("a blue square", negative_prompt="red", seed=5, scheduler="Euler a",
                                  num_inference_steps=3),
                "triangle.png": pipe("a green triangle", width=64, height=64, guidance_scale=3.0, seed=2,
                                     num_inference_steps=2)}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, result in expected.items():
        np.testing.assert_array_equal(_pixels(out / name), np.asarray(result.images[0]))
        assert edgesd.images.read_parameters(out / name)["seed"] == result.seed
    # a second run has nothing to do; a picture removed, and a half-written one left by a killed run, are made
    assert run_batch(prompts, out, BatchJob()).skipped == 3
    (out / "00002.png").unlink()
    stale = out / ".00002.png.partial-999999999"
    stale.write_bytes(b"\x89PNG half")
    report = run_batch(prompts, out, BatchJob())
    assert (report.written, report.skipped) == (1, 2)
    assert not stale.exists()
    np.testing.assert_array_equal(_pixels(out / "00002.png"), np.asarray(expected["00002.png"].images[0]))


def test_a_row_that_fails_is_named_and_the_others_are_made(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    prompts = _write(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "again", "image": "broken.png", "steps": 2}])
    result = CliRunner().invoke(main, ["batch", str(prompts), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "failed: line 2: image" in result.output and "cannot be read" in result.output
    assert "wrote 1 pictures" in result.output and "1 failed" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001.png"]


def test_img2img_rows(tmp_path, pipe):
    start = pipe("a red circle", num_inference_steps=3, seed=1).images[0]
    start.save(tmp_path / "start.png")
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "a blue circle", "image": "start.png", "strength": 0.5,
                                             "steps": 4, "seed": 3}])
    run_batch(prompts, tmp_path / "out", BatchJob())
    expected = pipe("a blue circle", image=start, strength=0.5, num_inference_steps=4, seed=3).images[0]
    np.testing.assert_array_equal(_pixels(tmp_path / "out" / "00001.png"), np.asarray(expected))


def test_a_process_pool_makes_the_same_pictures(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", ROWS)
    run_batch(prompts, tmp_path / "one", BatchJob())
    result = CliRunner().invoke(main, ["batch", str(prompts), str(tmp_path / "pool"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 pictures" in result.output
    for path in (tmp_path / "one").iterdir():
        assert (tmp_path / "pool" / path.name).read_bytes() == path.read_bytes()


def test_bad_batch_commands_are_one_line(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", ROWS[:1])
    runner = CliRunner()
    for args, needle in ((["missing.jsonl", "out"], "does not exist"),
                         ([str(prompts), str(tmp_path / "no" / "out")], "does not exist"),
                         ([str(prompts), str(prompts)], "is a file"),
                         ([str(prompts), str(tmp_path / "o"), "--workers", "0"], "--workers must be >= 1"),
                         ([str(prompts), str(tmp_path / "o"), "--ray", "127.0.0.1:9"], "cannot reach the Ray cluster")):
        result = runner.invoke(main, ["batch", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], (args, result.output)


@pytest.fixture
def ray_cluster(tmp_path):
    """A Ray head and one worker node on loopback (each with one CPU), stopped afterwards."""
    pytest.importorskip("ray")
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    port = __import__("tests.servers", fromlist=["free_port"]).free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    temp = Path("/tmp") / f"ray-edgesd-{os.getpid()}"  # Ray's socket paths must stay short
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        f"--temp-dir={temp}", *common], check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], check=True, env=env,
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_ray_cluster_makes_the_same_pictures(tmp_path, ray_cluster):
    prompts = _write(tmp_path / "p.jsonl", ROWS)
    run_batch(prompts, tmp_path / "one", BatchJob())
    out = tmp_path / "ray"
    (out).mkdir()
    shutil.copy(tmp_path / "one" / "00001.png", out / "00001.png")  # resumes on the cluster too
    result = CliRunner().invoke(main, ["batch", str(prompts), str(out), "--ray", ray_cluster, "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 pictures" in result.output and "skipped 1" in result.output
    for path in (tmp_path / "one").iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
