"""`edgesd serve` on loopback: the OpenAI Images API through the official `openai` client, A1111's /sdapi/v1/*
through plain HTTP (httpx), progress with previews, interrupt, tokens, and bad requests answered with a 4xx
while the server goes on serving."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

import edgesd

from .servers import Running

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def served(tiny_onnx):
    pipes = {"edgesd-tiny": edgesd.Pipeline.load(), "tiny-onnx": edgesd.Pipeline.load(tiny_onnx)}
    running = Running(pipes)
    yield running, pipes
    running.stop()


def _picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_generates_the_pictures_the_pipeline_makes(served):
    running, pipes = served
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused")
    assert {m.id for m in client.models.list().data} == {"edgesd-tiny", "tiny-onnx"}
    response = client.images.generate(model="edgesd-tiny", prompt=PROMPT, n=2, size="64x64",
                                      response_format="b64_json", extra_body={"seed": 5, "steps": 6})
    pictures = [_picture(d.b64_json) for d in response.data]
    expected = pipes["edgesd-tiny"](PROMPT, num_images_per_prompt=2, width=64, height=64, seed=5,
                                    num_inference_steps=6).images
    assert len(pictures) == 2 and all(p.size == (64, 64) for p in pictures)
    for got, want in zip(pictures, expected):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    assert "Seed: 5" in pictures[0].text["parameters"]


def test_openai_client_edits_with_a_transparent_mask(served):
    running, _ = served
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused")
    picture, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(picture, format="PNG")
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: repaint here
    alpha.save(mask, format="PNG")
    response = client.images.edit(model="edgesd-tiny", image=("in.png", picture.getvalue(), "image/png"),
                                  mask=("mask.png", mask.getvalue(), "image/png"), prompt=PROMPT, n=1,
                                  extra_body={"seed": "3"})
    out = _picture(response.data[0].b64_json)
    assert out.size == (64, 64) and "Seed: 3" in out.text["parameters"]
    kept = np.asarray(out.convert("RGB"), np.float64)[:8, :8]
    assert kept[..., 2].mean() > kept[..., 0].mean()  # outside the mask the blue picture stays


def test_a1111_txt2img_img2img_samplers_and_models(served):
    running, pipes = served
    with httpx.Client(base_url=running.url, timeout=60) as http:
        body = {"prompt": PROMPT, "steps": 5, "cfg_scale": 1.5, "width": 64, "height": 64, "seed": 7,
                "sampler_name": "DPM++ 2M", "scheduler": "Karras", "model": "edgesd-tiny"}
        reply = http.post("/sdapi/v1/txt2img", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        info = __import__("json").loads(data["info"])
        assert info["seed"] == 7 and info["sampler_name"] == "DPM++ 2M Karras" and len(data["images"]) == 1
        want = pipes["edgesd-tiny"](PROMPT, num_inference_steps=5, guidance_scale=1.5, width=64, height=64, seed=7,
                                    scheduler="DPM++ 2M Karras").images[0]
        assert np.array_equal(np.asarray(_picture(data["images"][0]).convert("RGB")), np.asarray(want))
        reply = http.post("/sdapi/v1/img2img", json={**body, "init_images": [data["images"][0]],
                                                      "denoising_strength": 0.5})
        assert reply.status_code == 200, reply.text
        names = [s["name"] for s in http.get("/sdapi/v1/samplers").json()]
        assert "DPM++ 2M Karras" in names and "Euler a" in names
        assert {m["model_name"] for m in http.get("/sdapi/v1/sd-models").json()} == {"edgesd-tiny", "tiny-onnx"}


def test_progress_shows_a_preview_and_interrupt_stops_the_generation(served):
    running, _ = served
    outcome = {}

    def long_job():
        with httpx.Client(base_url=running.url, timeout=120) as http:
            outcome["reply"] = http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 400, "sampler_name": "Euler", "width": 64,
                                                                     "height": 64, "model": "edgesd-tiny"})
    job = threading.Thread(target=long_job)
    job.start()
    with httpx.Client(base_url=running.url, timeout=30) as http:
        progress = {}
        for _ in range(400):
            progress = http.get("/sdapi/v1/progress", params={"model": "edgesd-tiny"}).json()
            if progress["state"]["sampling_step"] > 2 and progress["current_image"]:
                break
            time.sleep(0.05)
        assert 0 < progress["progress"] < 1 and _picture(progress["current_image"]).size[0] > 0
        assert http.post("/sdapi/v1/interrupt", params={"model": "edgesd-tiny"}).status_code == 200
        job.join(120)
        assert outcome["reply"].status_code == 409 and "interrupted" in outcome["reply"].json()["error"]["message"]
        after = http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64,
                                                      "model": "edgesd-tiny"})
        assert after.status_code == 200  # the next generation runs (not interrupted)


@pytest.mark.parametrize("method, path, kwargs, status, needle", [
    ("post", "/sdapi/v1/txt2img", {"content": b"{not json"}, 400, "not valid JSON"),
    ("post", "/sdapi/v1/txt2img", {"json": [1, 2]}, 400, "JSON object"),
    ("post", "/sdapi/v1/txt2img", {"json": {"prompt": "x"}}, 400, "model is required"),
    ("post", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "model": "nope"}}, 404, "not served"),
    ("post", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "model": "edgesd-tiny", "steps": 0}}, 400, "steps"),
    ("post", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "model": "edgesd-tiny", "width": 65}}, 400, "multiple"),
    ("post", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "model": "edgesd-tiny", "batch_size": 100}}, 400, "batch_size"),
    ("post", "/sdapi/v1/img2img", {"json": {"prompt": "x", "model": "edgesd-tiny", "init_images": ["%%"]}}, 400, "base64"),
    ("post", "/v1/images/generations", {"json": {"prompt": "x", "model": "edgesd-tiny", "size": "big"}}, 400, "WIDTHxHEIGHT"),
    ("post", "/v1/images/generations", {"json": {"prompt": "x", "model": "edgesd-tiny", "response_format": "url"}}, 400, "b64_json"),
    ("post", "/v1/images/generations", {"json": {"model": "edgesd-tiny"}}, 400, "prompt"),
    ("post", "/v1/images/edits", {"data": {"prompt": "x", "model": "edgesd-tiny"}}, 400, "image is required"),
    ("get", "/nowhere", {}, 404, "Not Found"),
    ("get", "/sdapi/v1/txt2img", {}, 405, "Method Not Allowed"),
])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(served, method, path, kwargs, status, needle):
    running, _ = served
    with httpx.Client(base_url=running.url, timeout=30) as http:
        reply = getattr(http, method)(path, **kwargs)
        assert reply.status_code == status, reply.text
        assert needle in reply.json()["error"]["message"] and "Traceback" not in reply.text
        ok = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                   "model": "edgesd-tiny"})
        assert ok.status_code == 200


def test_a_token_is_required_when_given():
    running = Running({"edgesd-tiny": edgesd.Pipeline.load()}, token="secret")
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="secret")
        assert client.images.generate(prompt="x", size="64x64", extra_body={"steps": 1}).data[0].b64_json  # one model
    finally:
        running.stop()
