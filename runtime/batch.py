"""`edgesd batch PROMPTS.jsonl OUT/`: one picture per JSON row, on a process pool or a Ray cluster.

Every row is read and checked against the model before any picture is made. A row's picture is
`OUT/<line, 5 digits>.png` (or `OUT/<name>.png` where the row names it), written whole or not at all, so a
run stopped at any point resumes where it stopped: rows whose picture exists are skipped. A row without a
seed gets `--seed` + its line number - 1, so a rerun, a resumed run and a cluster run make the same pictures.

Runners (one table): `local` makes the pictures in this process (`--workers 1`), `pool` in worker
processes that each load the model once, `ray` in Ray Data actors (`map_batches`) that each load the model
once; every runner hands the PNG bytes back to this process, which writes them.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import queue
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from .backends.base import RuntimeOptions
from .errors import EdgesdError
from .lora import LoraSpec
from .request import DEFAULT_MAX_PIXELS, parse_size

# row key -> (Pipeline argument, type); each is the `edgesd generate` option of the same name
ROW_FIELDS: dict[str, tuple[str, type]] = {
    "prompt": ("prompt", str), "negative": ("negative_prompt", str),
    "prompt_2": ("prompt_2", str), "negative_2": ("negative_prompt_2", str),
    "steps": ("num_inference_steps", int), "guidance": ("guidance_scale", float),
    "guidance_rescale": ("guidance_rescale", float), "guidance_cutoff": ("guidance_cutoff", float),
    "deepcache_interval": ("deepcache_interval", int), "token_merging": ("token_merging", float),
    "seed": ("seed", int),
    "width": ("width", int), "height": ("height", int), "sampler": ("scheduler", str),
    "noise": ("noise_generator", str), "eta": ("eta", float), "strength": ("strength", float),
    "vae_tiling": ("vae_tiling", str), "vae_tile_size": ("vae_tile_size", int),
}
# diffusers' names for the same fields, accepted too
ROW_ALIASES = {"negative_prompt": "negative", "negative_prompt_2": "negative_2", "num_inference_steps": "steps",
               "guidance_scale": "guidance", "scheduler": "sampler", "noise_generator": "noise"}
ROW_EXTRA = ("size", "name", "image", "mask")  # WIDTHxHEIGHT; the output's name; img2img / inpainting pictures
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}")


@dataclass(frozen=True)
class BatchRow:
    """One row of PROMPTS.jsonl: its line, the output's file name and the Pipeline's arguments."""

    line: int
    filename: str
    arguments: dict
    image: Path | None = None  # read when the row is made (by the worker)
    mask: Path | None = None


@dataclass(frozen=True)
class BatchJob:
    """What every worker loads: the model and how to run it (picklable, sent to worker processes and actors)."""

    model: Path | None = None  # None: the default model
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    loras: tuple[LoraSpec, ...] = ()
    vae_decoder: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class BatchReport:
    written: int = 0
    skipped: int = 0  # already in OUT
    failed: list[str] = field(default_factory=list)  # "line N: message"


def read_rows(path: Path, base_seed: int = 0) -> list[BatchRow]:
    """PROMPTS.jsonl -> rows; the first bad line raises EdgesdError naming it."""
    if not path.is_file():
        raise EdgesdError(f"prompts file '{path}' does not exist", "pass a .jsonl file, one JSON object per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EdgesdError(f"prompts file '{path}' is not UTF-8 text", "save it as UTF-8") from None
    rows, names = [], {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        row = _row(text, number, path, base_seed)
        if row.filename in names:
            raise EdgesdError(f"{path.name} line {number}: output {row.filename} is also line {names[row.filename]}'s",
                              "give each row its own name")
        names[row.filename] = number
        rows.append(row)
    if not rows:
        raise EdgesdError(f"prompts file '{path}' has no rows", 'write one JSON object per line, e.g. {"prompt": "a cat"}')
    return rows


def _row(text: str, number: int, path: Path, base_seed: int) -> BatchRow:
    where = f"{path.name} line {number}"
    try:
        values = json.loads(text)
    except ValueError as e:
        raise EdgesdError(f"{where}: not JSON ({e.msg})", 'write one JSON object per line, e.g. {"prompt": "a cat"}') \
            from None
    if not isinstance(values, dict):
        raise EdgesdError(f"{where}: a JSON {type(values).__name__}, not an object", 'e.g. {"prompt": "a cat"}')
    values = {ROW_ALIASES.get(key, key): value for key, value in values.items()}
    unknown = sorted(set(values) - set(ROW_FIELDS) - set(ROW_EXTRA))
    if unknown:
        raise EdgesdError(f"{where}: unknown key {unknown[0]!r}",
                          f"keys: {', '.join([*ROW_FIELDS, *ROW_EXTRA])}")
    if not isinstance(values.get("prompt"), str):
        raise EdgesdError(f"{where}: no prompt (a string)", 'e.g. {"prompt": "a cat", "seed": 1}')
    arguments = {}
    for key, value in values.items():
        if key in ROW_FIELDS:
            name, kind = ROW_FIELDS[key]
            arguments[name] = _typed(value, kind, f"{where}: {key}")
    if "size" in values:
        if "width" in values or "height" in values:
            raise EdgesdError(f"{where}: size and width/height are both given", "give one of them")
        arguments["width"], arguments["height"] = parse_size(values["size"], f"{where}: size")
    arguments.setdefault("seed", base_seed + number - 1)
    name = values.get("name", f"{number:05d}")
    if not isinstance(name, str) or not _NAME.fullmatch(name.removesuffix(".png")):
        raise EdgesdError(f"{where}: name {name!r} is not a plain file name",
                          "use letters, digits, '.', '_' and '-', starting with a letter or digit")
    pictures = {}
    for key in ("image", "mask"):
        if key in values:
            if not isinstance(values[key], str):
                raise EdgesdError(f"{where}: {key} must be a picture's path (a string)")
            pictures[key] = (path.parent / values[key]).absolute()  # relative to the prompts file
    return BatchRow(number, name.removesuffix(".png") + ".png", arguments, **pictures)


def _typed(value, kind: type, what: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EdgesdError(f"{what} is {value!r}, not a {'number' if kind is float else kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise EdgesdError(f"{what} is {value!r}, not a finite number")
    return value


def check_rows(rows: list[BatchRow], job: BatchJob) -> None:
    """Every row against the model (sizes, steps, sampler names, ...), before any picture is made."""
    from .model import ModelFolder
    from .models_path import default_model_path
    from .request import GenerationRequest
    from .schedulers import resolve_scheduler

    folder = ModelFolder.open(default_model_path() if job.model is None else job.model)
    for row in rows:
        try:
            arguments = dict(row.arguments, max_pixels=job.max_pixels)
            if row.image is not None:  # the picture's size is checked when it is read
                arguments.setdefault("width", folder.constants.default_image_size)
                arguments.setdefault("height", folder.constants.default_image_size)
                arguments["image"] = None
            if row.mask is not None and row.image is None:
                raise EdgesdError("mask needs image (the picture to repaint)", 'add "image": "picture.png"')
            request = GenerationRequest.build(folder, folder.family, **arguments)
            resolve_scheduler(request.scheduler, folder.scheduler_config)
            for picture in (row.image, row.mask):
                if picture is not None and not picture.is_file():
                    raise EdgesdError(f"picture '{picture}' does not exist", "paths are relative to the prompts file")
        except EdgesdError as e:
            raise EdgesdError(f"line {row.line}: {e}") from None


class RowMaker:
    """Loads the model once, then makes one row's PNG (bytes, with its parameters) per call."""

    def __init__(self, job: BatchJob):
        from .pipeline import Pipeline

        self.job = job
        self.pipe = Pipeline.load(job.model, job.options, vae_decoder=job.vae_decoder, loras=job.loras)

    def __call__(self, row: BatchRow) -> bytes:
        from .images import open_picture, png_bytes

        arguments = dict(row.arguments, max_pixels=self.job.max_pixels)
        if row.image is not None:
            arguments["image"] = open_picture(row.image, self.job.max_pixels)
        if row.mask is not None:
            arguments["mask_image"] = open_picture(row.mask, self.job.max_pixels, "mask")
        result = self.pipe(**arguments)
        return png_bytes(result.images[0], result.parameters)

    def attempt(self, row: BatchRow) -> tuple[int, bytes | None, str | None]:
        """(line, PNG bytes, None), or (line, None, the one-line error) for a row that cannot be made."""
        try:
            return row.line, self(row), None
        except EdgesdError as e:
            return row.line, None, str(e)


# --- runners: rows -> (line, PNG bytes or None, error or None), in the order they finish -----------------------

Runner = Callable[[BatchJob, list[BatchRow], int, str | None], Iterator[tuple[int, bytes | None, str | None]]]


def _run_here(job: BatchJob, rows: list[BatchRow], workers: int, address: str | None):
    maker = RowMaker(job)
    for row in rows:
        yield maker.attempt(row)


def _pool_worker(job: BatchJob, tasks, results) -> None:
    """A worker process: load the model once, then make rows until the None that ends the queue."""
    try:
        maker = RowMaker(job)
    except EdgesdError as e:
        results.put((None, None, str(e)))
        return
    except KeyboardInterrupt:
        return
    try:
        while (row := tasks.get()) is not None:
            results.put(maker.attempt(row))
    except KeyboardInterrupt:
        return


def _run_pool(job: BatchJob, rows: list[BatchRow], workers: int, address: str | None):
    context = multiprocessing.get_context("spawn")  # no forked copies of a loaded runtime's threads
    tasks, results = context.Queue(), context.Queue()
    for row in rows:
        tasks.put(row)
    for _ in range(workers):
        tasks.put(None)
    processes = [context.Process(target=_pool_worker, args=(job, tasks, results), daemon=True)
                 for _ in range(workers)]
    for process in processes:
        process.start()
    pending = len(rows)
    try:
        while pending:
            try:
                line, png, error = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    raise EdgesdError(f"the workers stopped with {pending} rows not made (killed? out of memory?)",
                                      "run the same command again to make the rest; try fewer --workers") from None
                continue
            if line is None:  # a worker could not load the model
                raise EdgesdError(error)
            pending -= 1
            yield line, png, error
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(5)


class _RayMaker:
    """A Ray Data actor: loads the model once (on its node), then makes the rows of each batch."""

    def __init__(self, job: BatchJob, rows: dict[int, BatchRow]):
        self.maker, self.rows = RowMaker(job), rows

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        made = [self.maker.attempt(self.rows[int(line)]) for line in batch["line"]]
        return {"line": np.array([m[0] for m in made]), "png": np.array([m[1] or b"" for m in made], dtype=object),
                "error": np.array([m[2] or "" for m in made], dtype=object)}


def _run_ray(job: BatchJob, rows: list[BatchRow], workers: int, address: str | None):
    try:
        import ray
        import ray.data
    except ImportError:
        raise EdgesdError("--ray needs the 'cluster' extra (ray[data] is not installed)",
                          "pip install -c constraints.txt 'edgesd[cluster]'") from None
    unreachable = EdgesdError(f"cannot reach the Ray cluster at {address}",
                              "start one (ray start --head) or pass its head's address, e.g. --ray 10.0.0.5:6379")
    _check_reachable(address, unreachable)  # ray.init waits minutes for a head that is not there
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, ValueError, RuntimeError):
        raise unreachable from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timing lines
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        threads = job.options.threads
        dataset = ray.data.from_items([{"line": row.line} for row in rows]).map_batches(
            _RayMaker, fn_constructor_kwargs={"job": job, "rows": {row.line: row for row in rows}},
            batch_size=1, concurrency=workers, num_cpus=threads or 1)
        for item in dataset.iter_rows():
            yield int(item["line"]), item["png"] or None, item["error"] or None
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        message = str(cause) if isinstance(cause, EdgesdError) else str(e).strip().splitlines()[-1][:240]
        raise EdgesdError(f"the Ray run failed: {message}",
                          "the model folder (and any image) must be at the same path on every node") from None
    finally:
        ray.shutdown()


def _check_reachable(address: str, error: EdgesdError) -> None:
    """A `host:port` head must answer on its port within seconds (other forms, e.g. 'auto', go to Ray)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError:
        raise error from None


RUNNERS: dict[str, Runner] = {"local": _run_here, "pool": _run_pool, "ray": _run_ray}


def run_batch(prompts: Path, out: Path, job: BatchJob, workers: int = 1, ray_address: str | None = None,
              base_seed: int = 0, on_row: Callable[[int, int], None] | None = None) -> BatchReport:
    """Make the pictures of `prompts` that `out` does not have yet. `on_row(done, total)` once before the first
    row (done 0) and after each."""
    from .images import remove_stale_partial_files, write_whole

    if workers < 1:
        raise EdgesdError(f"--workers must be >= 1, got {workers}")
    rows = read_rows(prompts, base_seed)
    check_rows(rows, job)
    if not out.parent.is_dir():
        raise EdgesdError(f"the folder '{out.parent}' for OUT does not exist", "create it first")
    if out.exists() and not out.is_dir():
        raise EdgesdError(f"OUT '{out}' is a file", "name a folder")
    out.mkdir(exist_ok=True)
    remove_stale_partial_files(out)
    todo = [row for row in rows if not (out / row.filename).is_file()]
    report = BatchReport(skipped=len(rows) - len(todo))
    if not todo:
        return report
    runner = "ray" if ray_address is not None else "pool" if workers > 1 and len(todo) > 1 else "local"
    if runner == "pool" and job.options.threads is None:  # share the cores between the workers
        job = replace(job, options=replace(job.options, threads=max(1, (os.cpu_count() or 1) // workers)))
    by_line = {row.line: row for row in todo}
    if on_row is not None:
        on_row(0, len(todo))  # the bar's length, before the first picture (a pool starts in seconds)
    for done, (line, png, error) in enumerate(RUNNERS[runner](job, todo, min(workers, len(todo)), ray_address), 1):
        if png is not None:
            write_whole(out / by_line[line].filename, png)
            report.written += 1
        else:
            report.failed.append(f"line {line}: {error}")
        if on_row is not None:
            on_row(done, len(todo))
    return report
