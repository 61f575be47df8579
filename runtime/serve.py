"""`edgesd serve`: the OpenAI Images API and A1111's `/sdapi/v1/*` over loaded models (Starlette on uvicorn).

One queue per model: generations run one at a time, in a worker thread, in the order they came; the
current one reports its step and a preview (`/sdapi/v1/progress`) and stops at `/sdapi/v1/interrupt`.
Bad requests get a 4xx JSON error with the one-line message and the server goes on serving. Loopback only
unless `--host` says otherwise; with `--token` every request needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from .errors import Cancelled, EdgesdError
from .images import parameters_text, png_bytes
from .pipeline import Pipeline
from .request import parse_size
from .schedulers import A1111_OF, SAMPLERS

MAX_IMAGES = 8  # per request (n, batch_size x n_iter)
WEB = Path(__file__).parent / "web"  # the page at /


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Progress:
    """What the model's current generation has done (A1111's /progress)."""

    step: int = 0
    total: int = 0
    jobs: int = 0  # running + waiting
    started: float = 0.0
    preview: Callable[[], list[Image.Image]] | None = None  # made only when /progress asks for a picture
    interrupted: bool = False


@dataclass
class Served:
    """One served model: its pipeline, its queue (a lock taken in arrival order) and its progress."""

    name: str
    pipe: Pipeline
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    progress: Progress = field(default_factory=Progress)
    guard: threading.Lock = field(default_factory=threading.Lock)  # progress is written by the worker thread

    async def generate(self, arguments: dict):
        """Run one generation (the Pipeline's arguments) after those queued before it."""
        with self.guard:
            self.progress.jobs += 1
        try:
            async with self.lock:
                with self.guard:
                    self.progress = Progress(jobs=self.progress.jobs, started=time.time())
                return await asyncio.to_thread(self._run, arguments)
        finally:
            with self.guard:
                self.progress.jobs -= 1

    def _run(self, arguments: dict):
        def on_step(step: int, total: int, preview) -> bool:
            with self.guard:
                self.progress.step, self.progress.total, self.progress.preview = step, total, preview
                return not self.progress.interrupted
        return self.pipe(**arguments, callback=on_step)

    def interrupt(self) -> None:
        with self.guard:
            self.progress.interrupted = True


def _png_b64(image: Image.Image, params: dict | None = None) -> str:
    return base64.b64encode(png_bytes(image, params)).decode()


def _image_from_b64(data: str, what: str) -> Image.Image:
    if not isinstance(data, str):
        raise HttpError(400, f"{what} must be a base64 string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return _open_image(base64.b64decode(data, validate=True), what)
    except ValueError:
        raise HttpError(400, f"{what} is not valid base64") from None


def _open_image(raw: bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return image.copy()
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise HttpError(400, f"{what} is not a picture Pillow reads ({e.__class__.__name__})") from None


def _size(text, default: int) -> tuple[int, int]:
    if text in (None, "", "auto"):
        return default, default
    try:
        return parse_size(text)
    except EdgesdError as e:
        raise HttpError(400, str(e)) from None


def _count(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_IMAGES:
        raise HttpError(400, f"{name} must be a whole number from 1 to {MAX_IMAGES}, got {value!r}")
    return value


class Server:
    """The routes over a set of served models (built by `app`)."""

    def __init__(self, models: dict[str, Served], token: str | None):
        self.models, self.token = models, token

    def model(self, name: str | None) -> Served:
        if name in (None, "") and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name in (None, ""):
            raise HttpError(400, f"model is required when several are served: {', '.join(self.models)}")
        if name not in self.models:
            raise HttpError(404, f"model {name!r} is not served; served: {', '.join(self.models)}", "not_found_error")
        return self.models[name]

    # --- OpenAI Images API -------------------------------------------------------------------------------

    async def openai_generations(self, body: dict) -> dict:
        served = self.model(body.get("model"))
        if body.get("response_format", "b64_json") != "b64_json":
            raise HttpError(400, "response_format must be b64_json (edgesd keeps no files to link to)")
        prompt = body.get("prompt")
        width, height = _size(body.get("size"), served.pipe.constants.default_image_size)
        args = dict(prompt=prompt, width=width, height=height, num_images_per_prompt=_count(body.get("n", 1), "n"))
        args.update(_extras(body))
        result = await served.generate(args)
        return {"created": int(time.time()),
                "data": [{"b64_json": _png_b64(image, result.parameters)} for image in result.images]}

    async def openai_edits(self, form) -> dict:
        served = self.model(form.get("model"))
        if form.get("response_format", "b64_json") != "b64_json":
            raise HttpError(400, "response_format must be b64_json (edgesd keeps no files to link to)")
        upload = form.get("image") or form.get("image[]")
        if upload is None or not hasattr(upload, "read"):
            raise HttpError(400, "image is required (a PNG file part)")
        image = _open_image(await upload.read(), "image")
        args = dict(prompt=form.get("prompt"), image=image.convert("RGB"),
                    num_images_per_prompt=_count(int(form.get("n", 1)) if str(form.get("n", 1)).isdigit() else
                                                 form.get("n"), "n"))
        if form.get("size"):
            args["width"], args["height"] = _size(form.get("size"), 0)
        args.update(_form_extras(form))
        mask = form.get("mask")
        if mask is not None and hasattr(mask, "read"):
            picture = _open_image(await mask.read(), "mask")
            # OpenAI: the mask's fully transparent pixels are where to edit; without alpha, white repaints
            if picture.mode in ("RGBA", "LA") or "transparency" in picture.info:
                alpha = picture.convert("RGBA").getchannel("A")
                args["mask_image"] = alpha.point(lambda a: 255 if a == 0 else 0)
            else:
                args["mask_image"] = picture.convert("L")
            if args["mask_image"].size != image.size:
                raise HttpError(400, f"mask is {args['mask_image'].size[0]}x{args['mask_image'].size[1]} but image "
                                     f"is {image.size[0]}x{image.size[1]}")
        result = await served.generate(args)
        return {"created": int(time.time()),
                "data": [{"b64_json": _png_b64(image, result.parameters)} for image in result.images]}

    def openai_models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "edgesd"}
                                           for name in self.models]}

    # --- A1111 API ---------------------------------------------------------------------------------------

    async def a1111(self, body: dict, img2img: bool) -> dict:
        served = self.model(body.get("model") or (body.get("override_settings") or {}).get("sd_model_checkpoint"))
        count = _count(body.get("batch_size", 1), "batch_size") * _count(body.get("n_iter", 1), "n_iter")
        if count > MAX_IMAGES:
            raise HttpError(400, f"batch_size x n_iter must be at most {MAX_IMAGES}, got {count}")
        seed = body.get("seed", -1)
        args = dict(prompt=body.get("prompt", ""), negative_prompt=body.get("negative_prompt") or None,
                    num_inference_steps=body.get("steps", 20), guidance_scale=body.get("cfg_scale", 7.0),
                    width=body.get("width", 512), height=body.get("height", 512), num_images_per_prompt=count,
                    seed=None if seed in (-1, None) else seed)
        sampler = body.get("sampler_name") or body.get("sampler_index")
        if sampler:
            schedule = body.get("scheduler")
            args["scheduler"] = sampler if schedule in (None, "", "Automatic") else f"{sampler} {schedule}"
        if img2img:
            pictures = body.get("init_images") or []
            if not pictures:
                raise HttpError(400, "init_images needs one base64 picture")
            args["image"] = _image_from_b64(pictures[0], "init_images[0]").convert("RGB")
            args["strength"] = body.get("denoising_strength", 0.75)
            if body.get("mask"):
                mask = _image_from_b64(body["mask"], "mask").convert("L")
                args["mask_image"] = mask if not body.get("inpainting_mask_invert") else mask.point(lambda v: 255 - v)
        result = await served.generate(args)
        text = parameters_text(result.parameters)
        seeds = [result.seed] * len(result.images)
        info = {"prompt": args["prompt"], "all_prompts": [args["prompt"]] * len(result.images),
                "negative_prompt": args["negative_prompt"] or "", "seed": result.seed, "all_seeds": seeds,
                "width": result.parameters["width"], "height": result.parameters["height"],
                "sampler_name": A1111_OF.get(result.parameters["scheduler"], result.parameters["scheduler"]),
                "cfg_scale": result.parameters["guidance_scale"],
                "steps": result.parameters["steps"], "batch_size": count, "sd_model_name": served.name,
                "infotexts": [text] * len(result.images)}
        return {"images": [_png_b64(image, result.parameters) for image in result.images],
                "parameters": {k: v for k, v in body.items() if k not in ("init_images", "mask")},
                "info": json.dumps(info)}

    async def a1111_progress(self, name: str | None, with_image: bool) -> dict:
        served = self.model(name)
        with served.guard:
            p = served.progress
            done = p.step / p.total if p.total else 0.0
            elapsed = time.time() - p.started if p.started else 0.0
            preview = p.preview if with_image and p.jobs else None
            state = {"progress": round(done, 4) if p.jobs else 0.0,
                     "eta_relative": round(elapsed / done - elapsed, 2) if done and p.jobs else 0.0,
                     "state": {"sampling_step": p.step, "sampling_steps": p.total, "job_count": p.jobs,
                               "interrupted": p.interrupted}}
        # the picture of the current estimate, made now (not at every step) and off the event loop
        picture = await asyncio.to_thread(lambda: preview()[0]) if preview is not None else None
        return {**state, "current_image": _png_b64(picture) if picture is not None else None}

    def a1111_samplers(self) -> list:
        return [{"name": A1111_OF.get(name, name), "aliases": [name], "options": {}} for name in SAMPLERS]

    def edgesd_models(self) -> list:
        """Each served model's own defaults (the web page fills its form from them)."""
        out = []
        for name, served in self.models.items():
            pipe = served.pipe
            out.append({"name": name, "family": pipe.family.name, "width": pipe.constants.default_image_size,
                        "height": pipe.constants.default_image_size, "size_multiple": pipe.constants.image_size_multiple,
                        "steps": pipe.defaults.num_inference_steps, "guidance": pipe.defaults.guidance_scale})
        return out

    def a1111_models(self) -> list:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None,
                 "filename": str(served.pipe.folder.root), "config": None} for name, served in self.models.items()]


def _extras(body: dict) -> dict:
    """edgesd's own fields the OpenAI request may carry beside OpenAI's (steps, guidance, seed, ...)."""
    names = {"negative_prompt": "negative_prompt", "steps": "num_inference_steps", "num_inference_steps":
             "num_inference_steps", "guidance_scale": "guidance_scale", "seed": "seed", "scheduler": "scheduler"}
    return {ours: body[key] for key, ours in names.items() if key in body}


def _form_extras(form) -> dict:
    """_extras for a multipart form, whose fields are all text."""
    kinds = {"steps": int, "num_inference_steps": int, "seed": int, "guidance_scale": float, "strength": float,
             "negative_prompt": str, "scheduler": str}
    out = {}
    for key, kind in kinds.items():
        if form.get(key) is not None:
            try:
                out[key] = kind(form.get(key))
            except ValueError:
                raise HttpError(400, f"{key} {form.get(key)!r} is not a {kind.__name__}") from None
    extras = _extras(out)
    if "strength" in out:
        extras["strength"] = out["strength"]
    return extras


def app(models: dict[str, Pipeline], token: str | None = None):
    """The ASGI app serving `models` (name -> Pipeline)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    server = Server({name: Served(name, pipe) for name, pipe in models.items()}, token)

    def endpoint(handler, kind: str = "json"):
        async def run(request: Request):
            try:
                if token is not None and request.headers.get("authorization") != f"Bearer {token}":
                    raise HttpError(401, "a bearer token is required (Authorization: Bearer <token>)",
                                    "authentication_error")
                if kind == "json":
                    try:
                        body = await request.json()
                    except (ValueError, UnicodeDecodeError):
                        raise HttpError(400, "the request body is not valid JSON") from None
                    if not isinstance(body, dict):
                        raise HttpError(400, "the request body must be a JSON object")
                    result = await handler(body)
                elif kind == "form":
                    try:
                        form = await request.form()
                    except Exception as e:  # a malformed multipart body
                        raise HttpError(400, f"the request body is not a multipart form ({e.__class__.__name__})") from None
                    result = await handler(form)
                elif kind == "async":
                    result = await handler(request)
                else:
                    result = handler(request)
                return JSONResponse(result)
            except HttpError as e:
                return JSONResponse({"error": {"message": e.message, "type": e.kind}}, status_code=e.status)
            except Cancelled as e:
                return JSONResponse({"error": {"message": f"interrupted: {e}", "type": "cancelled"}}, status_code=409)
            except EdgesdError as e:
                return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)
            except Exception as e:  # a bug: one line, no traceback, and the server goes on
                return JSONResponse({"error": {"message": f"internal error: {e.__class__.__name__}: {str(e)[:200]}",
                                               "type": "server_error"}}, status_code=500)
        return run

    def interrupt(request: Request) -> dict:
        for served in (server.models.values() if not request.query_params.get("model")
                       else [server.model(request.query_params["model"])]):
            served.interrupt()
        return {}

    routes = [
        Route("/", lambda request: FileResponse(WEB / "index.html"), methods=["GET"]),
        Mount("/web", StaticFiles(directory=WEB), name="web"),  # the page: plain HTML/JS, no token needed
        Route("/edgesd/v1/models", endpoint(lambda r: server.edgesd_models(), "plain"), methods=["GET"]),
        Route("/v1/models", endpoint(lambda r: server.openai_models(), "plain"), methods=["GET"]),
        Route("/v1/images/generations", endpoint(server.openai_generations), methods=["POST"]),
        Route("/v1/images/edits", endpoint(server.openai_edits, "form"), methods=["POST"]),
        Route("/sdapi/v1/txt2img", endpoint(lambda body: server.a1111(body, img2img=False)), methods=["POST"]),
        Route("/sdapi/v1/img2img", endpoint(lambda body: server.a1111(body, img2img=True)), methods=["POST"]),
        Route("/sdapi/v1/progress", endpoint(lambda r: server.a1111_progress(
            r.query_params.get("model"), r.query_params.get("skip_current_image", "false") != "true"), "async"),
            methods=["GET"]),
        Route("/sdapi/v1/interrupt", endpoint(interrupt, "plain"), methods=["POST"]),
        Route("/sdapi/v1/sd-models", endpoint(lambda r: server.a1111_models(), "plain"), methods=["GET"]),
        Route("/sdapi/v1/samplers", endpoint(lambda r: server.a1111_samplers(), "plain"), methods=["GET"]),
    ]

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}",
                                       "type": "not_found_error" if status == 404 else "invalid_request_error"}},
                            status_code=status)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def model_name(path: Path | None) -> str:
    from .models_path import default_model_path

    return Path(default_model_path() if path is None else path).resolve().name


def serve(models: list[Path], host: str, port: int, token: str | None, load=Pipeline.load) -> None:
    """Load the models and serve them until interrupted (uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        raise EdgesdError("edgesd serve needs the 'serve' extra (uvicorn is not installed)",
                          "pip install -c constraints.txt 'edgesd[serve]'") from None
    pipes: dict[str, Pipeline] = {}
    for path in models or [None]:
        name = model_name(path)
        if name in pipes:
            raise EdgesdError(f"two models are named {name!r}", "serve folders with different names")
        pipes[name] = load(path)
    uvicorn.run(app(pipes, token), host=host, port=port, log_level="warning")
