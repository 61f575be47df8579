"""OpenVINO backend: OpenVINO IR folders (ours, or written by `optimum-cli export openvino`) and ONNX files.

A graph is read once and compiled on first use. With static shapes (the default) it is reshaped to the
shapes of the first call and compiled for exactly those; a call with other shapes (a new size or batch)
compiles again. A cache folder keeps compiled models, so the next start skips compilation.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov

from ..cache import mark_used, prune
from ..errors import EdgesdError
from ..graphs import GraphSpec, check_feed
from .base import RuntimeOptions, add_delta, check_names, fit_feeds

VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


def check_device(core: ov.Core, device: str) -> None:
    """Raise a clear error for a device name this OpenVINO does not know ("GPU.1" and "AUTO:GPU,CPU" work)."""
    head, _, rest = device.partition(":")
    names = [d for d in rest.split(",") if d] if head.upper() in VIRTUAL_DEVICES else [device]
    available = core.available_devices  # e.g. ["CPU", "GPU.0", "GPU.1"]
    known = set(available) | {d.split(".")[0] for d in available}
    unknown = [d for d in names if d not in known]
    if unknown or not device:
        raise EdgesdError(f"OpenVINO does not know device '{unknown[0] if unknown else device}'",
                          f"this machine has: {', '.join(available + ['AUTO'])}")


def _change_constants(model: ov.Model, deltas: dict, path: Path) -> None:
    """Replace each Constant named in `deltas` by itself plus its delta (a LoRA), in the model read from `path`."""
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    missing = sorted(set(deltas) - set(constants))
    if missing:
        raise EdgesdError(f"{path} has no weight {missing[0]} (its weights.json is out of date)", "re-export the model")
    for name, delta in deltas.items():
        old = constants[name]
        new = ov.op.Constant(add_delta(old.get_data(), delta, f"{path}: {name}"))
        new.set_friendly_name(name)
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))


def compile_config(options: RuntimeOptions) -> dict[str, str]:
    config = {"PERFORMANCE_HINT": options.ov_hint.upper()}
    if options.ov_precision != "device-default":
        config["INFERENCE_PRECISION_HINT"] = options.ov_precision
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = str(options.threads)
    cache = options.cache_folder()
    if cache is not None:
        # One folder per device and precision: OpenVINO's own key missed the precision once (AUTO after CPU
        # f32 loaded the f32 blob under a bf16 hint and returned NaN, tests/test_backends.py).
        setting = f"{ov.get_version()}|{options.device}|{options.ov_precision}|{options.ov_hint}"
        folder = cache / f"openvino-{hashlib.sha256(setting.encode()).hexdigest()[:12]}"
        folder.mkdir(exist_ok=True)
        config["CACHE_DIR"] = str(folder)
    return config


class OvGraph:
    def __init__(self, path: Path, spec: GraphSpec, options: RuntimeOptions,
                 weight_deltas: dict | None = None):
        self.path = Path(path)
        self.spec = spec
        self._core = ov.Core()
        check_device(self._core, options.device)
        self._device = options.device
        self._static = options.ov_shapes == "static"
        self._config = compile_config(options)  # its CACHE_DIR folder is made by options.cache_folder()
        self._cache_max_bytes = options.cache_max_bytes()
        try:
            self._model = self._core.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line trace
            raise EdgesdError(f"{self.path} is not a readable OpenVINO graph ({_first_reason(e)})",
                              "re-export the model with `edgesd export --format openvino`") from None
        if weight_deltas:
            _change_constants(self._model, weight_deltas, self.path)
            self._config.pop("CACHE_DIR", None)  # a compiled-model cache would be keyed on the file's weights
        inputs = {_port_name(p, spec.input_names): p for p in self._model.inputs}
        outputs = {name for p in self._model.outputs for name in p.get_names()}
        self._outputs = check_names(self.path, spec, set(inputs), outputs,
                                    "export it with `edgesd export --format openvino` or `optimum-cli export openvino`")
        self._ranks = {name: p.get_partial_shape().rank.get_length() for name, p in inputs.items()}
        self._dtypes = {name: np.dtype(p.get_element_type().to_dtype()) for name, p in inputs.items()}
        # The compiled model for the latest shapes; each caller keeps its own infer request on it (`local`).
        self._compiled: ov.CompiledModel | None = None
        self._ports: dict = {}  # output name -> the compiled model's output port
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._compiling = threading.Lock()  # reshape + compile change the shared model
        self._own: dict = {}  # the state of callers that pass no `local` (one thread at a time)
        self.compile_seconds = 0.0  # total time spent compiling, for benchmarks
        self.placement = {f"openvino {self._device}": len(self._model.get_ops())}  # OpenVINO runs them all there

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def _compiled_for(self, shapes: dict[str, tuple[int, ...]]) -> tuple[ov.CompiledModel, dict, float]:
        """The compiled model for these input shapes (compiling if needed), its output ports, seconds spent."""
        with self._compiling:
            if self._compiled is not None and (not self._static or shapes == self._shapes):
                return self._compiled, self._ports, 0.0
            return self._compile(shapes)

    def _compile(self, shapes: dict[str, tuple[int, ...]]) -> tuple[ov.CompiledModel, dict, float]:
        start = time.perf_counter()
        self._compiled = None  # release the old compiled model before building the next
        try:
            if self._static:
                self._model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
            started = time.time()
            if self._static and "CACHE_DIR" in self._config:
                self._compiled = self._compile_static_copy(shapes)
            else:
                self._compiled = self._core.compile_model(self._model, self._device, self._config)
            if "CACHE_DIR" in self._config:  # the blob it read or wrote stays; older ones go past the limit
                prune(Path(self._config["CACHE_DIR"]).parent, self._cache_max_bytes, used_since=started)
        except EdgesdError:
            raise
        except Exception as e:
            raise EdgesdError(f"{self.path}: OpenVINO cannot compile it for {self._device} with inputs "
                              f"{shapes} ({_first_reason(e)})", "check the size and batch, or use --device CPU"
                              ) from None
        self._ports = {name: self._compiled.output(name) for name in self._outputs}
        self._shapes = shapes
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        return self._compiled, self._ports, seconds

    def _compile_static_copy(self, shapes: dict[str, tuple[int, ...]]) -> ov.CompiledModel:
        """Compile the reshaped model from a copy of it saved in the cache folder (static-<key>.xml/.bin).

        Given a model object, OpenVINO hashes its weights to find its compiled blob: every weight page of the
        mapped IR is touched and stays resident beside the blob (SD 1.5 int8 U-Net from the cache: 2.93 GB peak
        RSS). Given a file, it hashes the file and reads the blob alone: 2.07 GB, as fast (3 s on 2 cores).
        The copy is written once per graph and shape; a damaged one is written again."""
        folder = Path(self._config["CACHE_DIR"])
        xml = folder / f"static-{static_copy_key(self.path, shapes)}.xml"
        for attempt in range(2):
            if not xml.is_file():
                _save_atomically(self._model, xml)
                self._model = self._core.read_model(str(self.path))  # drop the pages saving touched
                self._model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
            try:
                compiled = self._core.compile_model(str(xml), self._device, self._config)
                mark_used(xml, xml.with_suffix(".bin"))
                return compiled
            except Exception:
                if attempt:
                    raise
                for f in (xml, xml.with_suffix(".bin")):  # cut short or corrupt: written again
                    f.unlink(missing_ok=True)

    def run(self, feeds: dict[str, np.ndarray], local: dict | None = None,
            release: bool = False) -> dict[str, np.ndarray]:
        """`local` keeps this caller's infer request (and the compiled model it belongs to) between calls, and
        adds compile time to local["compile_s"]; without it the graph's own is used (one thread at a time).
        `release` changes nothing here: OpenVINO's plugin keeps its own memory pool."""
        check_feed(self.spec, feeds)
        cast = fit_feeds(self.path, feeds, self._dtypes, self._ranks)
        shapes = {name: tuple(v.shape) for name, v in cast.items()}
        local = self._own if local is None else local
        if local.get("shapes") != shapes or "request" not in local:
            compiled, ports, seconds = self._compiled_for(shapes)
            local.update(request=compiled.create_infer_request(), ports=ports, shapes=shapes,
                         compile_s=local.get("compile_s", 0.0) + seconds)
        request, ports = local["request"], local["ports"]
        try:
            result = request.infer(cast)
        except Exception as e:
            raise EdgesdError(f"{self.path} failed on inputs {shapes} ({_first_reason(e)})",
                              "check the requested size and batch, or re-export the model") from None
        # Copies: the request reuses its output buffers on the next call.
        return {name: np.array(result[port], dtype=np.float32 if result[port].dtype == np.float16 else None)
                for name, port in ports.items()}


def static_copy_key(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """The IR file (path, size and time of its .xml and .bin), the input shapes and OpenVINO's version."""
    parts = [str(path.resolve()), ov.get_version(), repr(sorted(shapes.items()))]
    for f in (path, path.with_suffix(".bin")):
        if f.is_file():
            st = f.stat()
            parts += [f.name, str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _save_atomically(model: ov.Model, xml: Path) -> None:
    """Save `model` as xml and its .bin: both written under temporary names, the .bin moved first, so an .xml
    in the cache always has its weights beside it."""
    tmp = xml.with_name(f".partial-{os.getpid()}-{threading.get_ident()}-{xml.name}")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    finally:
        for f in (tmp, tmp.with_suffix(".bin")):
            f.unlink(missing_ok=True)


def _port_name(port, wanted: list[str]) -> str:
    """A port can carry several names; prefer the one the graph description uses."""
    names = sorted(port.get_names())
    return next((n for n in names if n in wanted), names[0] if names else "")


_TRACE_LINES = ("Exception from", "Check '", "FrontEnd API failed")


def _first_reason(e: Exception) -> str:
    """OpenVINO's messages are traces ('Exception from file:line:', "Check '...' failed at", 'FrontEnd API
    failed with ...') around the reason; keep the reason, the deepest line that is not such a trace."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reasons = [ln for ln in lines if not ln.startswith(_TRACE_LINES)]
    return (reasons[-1] if reasons else lines[-1] if lines else str(e))[:240]
