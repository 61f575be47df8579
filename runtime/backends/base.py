"""The interface every backend implements, and the options that choose and tune a backend."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

from ..cache import DEFAULT_MAX_GB
from ..errors import EdgesdError
from ..graphs import UNET_VARIANTS, GraphSpec

Backend = Literal["auto", "onnxruntime", "openvino"]
OrtOptimization = Literal["disable", "basic", "extended", "all"]
OvHint = Literal["latency", "throughput"]
OvPrecision = Literal["f32", "bf16", "f16", "device-default"]
OvShapes = Literal["static", "dynamic"]
CacheMode = Literal["on", "off"]
IoBinding = Literal["auto", "off"]
MemoryMode = Literal["fast", "low"]
GuidanceBatch = Literal["auto", "joint", "split"]
DeviceArena = Literal["auto", "per-graph", "shared", "per-run", "per-stage"]

BACKENDS: tuple[str, ...] = get_args(Backend)
ORT_OPTIMIZATIONS: tuple[str, ...] = get_args(OrtOptimization)
OV_HINTS: tuple[str, ...] = get_args(OvHint)
OV_PRECISIONS: tuple[str, ...] = get_args(OvPrecision)
OV_SHAPES: tuple[str, ...] = get_args(OvShapes)
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
IO_BINDINGS: tuple[str, ...] = get_args(IoBinding)
MEMORY_MODES: tuple[str, ...] = get_args(MemoryMode)
GUIDANCE_BATCHES: tuple[str, ...] = get_args(GuidanceBatch)
DEVICE_ARENAS: tuple[str, ...] = get_args(DeviceArena)
# The graphs --component-provider can place; "text_encoder" places every text encoder (SDXL has two).
PLACEABLE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def default_cache_dir() -> Path:
    """Where optimised / compiled graphs are kept unless told otherwise: $EDGESD_CACHE_DIR, else the user's
    cache folder (XDG_CACHE_HOME, LOCALAPPDATA on Windows, ~/.cache) / edgesd."""
    import os

    if os.environ.get("EDGESD_CACHE_DIR"):
        return Path(os.environ["EDGESD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA") or Path.home() / ".cache"
    return Path(base) / "edgesd"


@dataclass(frozen=True)
class RuntimeOptions:
    """How graphs are run. Each field is one `edgesd generate` option of the same name."""

    backend: Backend = "auto"  # auto: openvino for a folder of OpenVINO IR graphs, else onnxruntime
    threads: int | None = None  # intra-op threads (default: the backend's, one per core)
    # fast: every graph stays loaded; low: a graph is loaded when its stage starts and freed when it ends, so
    # one component is in memory at a time (each picture loads them again; calls take turns)
    memory: MemoryMode = "fast"
    # a guided step's two halves (negative and positive prompt): joint, one U-Net call of batch 2B; split, two
    # calls of batch B (the same pictures, half the activation memory; faster on CPUs, bench/memory_mode.py);
    # auto: split where the graphs run on the CPU, joint on GPUs and other devices
    guidance_batch: GuidanceBatch = "auto"
    # onnxruntime keeps optimised graphs, openvino compiled models: the next start skips that work
    cache: CacheMode = "on"
    cache_dir: Path | None = None  # None: default_cache_dir()
    # the most the cache's entries may hold; past it the least recently used go (edgesd.cache)
    cache_max_gb: float = DEFAULT_MAX_GB
    # ONNX Runtime only
    provider: str = "cpu"  # execution providers, comma-separated, in order of preference
    provider_options: tuple[tuple[str, str], ...] = ()  # KEY=VALUE pairs for the first provider
    # COMPONENT=PROVIDERS pairs: those graphs run on other providers than --provider's (their provider options
    # are the providers' defaults), e.g. the text encoder on the CPU to save a GPU's memory
    component_providers: tuple[tuple[str, str], ...] = ()
    # on a provider with its own memory (CUDA): per-graph, each graph's session has its arena; shared, one
    # arena per device for the whole process, so the U-Net's and the VAE's working memory are the same
    # memory (never given back while the process runs); per-run, each graph's arena gives back what is free
    # at the end of each run (ONNX Runtime's arena shrinkage), so no graph holds working memory while another
    # runs (on the H200: 2.79 instead of 3.65 GB, steps 0-40% slower, bench/results/gpu-h200-2026-12-03*.md);
    # per-stage, the same at the end of each graph's part of a picture: after the text encoder's and each
    # VAE run, and after the U-Net's last step, so the steps between keep their memory (on the H200: 2.79 GB
    # at per-graph speed, bench/results/gpu-h200-2026-12-04.md); auto, per-stage where the provider's arena
    # can shrink (cuda), else per-graph
    device_arena: DeviceArena = "auto"
    ort_optimization: OrtOptimization = "all"  # graph optimisation level
    # auto: on a provider with its own memory (CUDA), outputs are made there and inputs that repeat from one
    # call to the next (the prompt's embeddings over the steps) are copied there once (I/O binding)
    io_binding: IoBinding = "auto"
    # OpenVINO only
    device: str = "CPU"  # an OpenVINO device name: CPU, GPU, NPU, AUTO, ...
    ov_hint: OvHint = "latency"  # latency: one request as fast as possible; throughput: many streams
    # OpenVINO computes in bf16 on CPUs that have it unless told f32; f32 keeps images equal to ONNX Runtime's.
    ov_precision: OvPrecision = "f32"
    ov_shapes: OvShapes = "static"  # static: recompile for each new size/batch (faster steps)

    def __post_init__(self):
        for name, allowed in (("backend", BACKENDS), ("memory", MEMORY_MODES), ("guidance_batch", GUIDANCE_BATCHES),
                              ("cache", CACHE_MODES), ("ort_optimization", ORT_OPTIMIZATIONS),
                              ("io_binding", IO_BINDINGS), ("device_arena", DEVICE_ARENAS),
                              ("ov_hint", OV_HINTS), ("ov_precision", OV_PRECISIONS), ("ov_shapes", OV_SHAPES)):
            if getattr(self, name) not in allowed:
                raise EdgesdError(f"unknown {name} '{getattr(self, name)}'", f"use one of: {', '.join(allowed)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise EdgesdError(f"threads must be a positive whole number, got {self.threads!r}",
                              "leave it unset for one thread per core")
        if isinstance(self.cache_max_gb, bool) or not isinstance(self.cache_max_gb, (int, float)) \
                or not self.cache_max_gb > 0:
            raise EdgesdError(f"cache_max_gb must be a number of GB above 0, got {self.cache_max_gb!r}",
                              "e.g. --cache-max-gb 20, or --cache off for no cache")
        if not self.provider.strip():
            raise EdgesdError("no execution provider given", "use e.g. --provider cpu")
        for component, providers in self.component_providers:
            if component not in PLACEABLE_COMPONENTS:
                raise EdgesdError(f"--component-provider: unknown component '{component}'",
                                  f"use one of: {', '.join(PLACEABLE_COMPONENTS)}, e.g. text_encoder=cpu")
            if not providers.strip():
                raise EdgesdError(f"--component-provider {component}= names no provider", "e.g. text_encoder=cpu")

    def for_component(self, component: str) -> "RuntimeOptions":
        """The options `component`'s graph loads with: its --component-provider (with that provider's own
        defaults as options, unless it is --provider's first), else these."""
        # every text encoder goes where text_encoder does; graphs made from the U-Net where the U-Net does
        kind = "text_encoder" if component.startswith("text_encoder") else "unet" if component in UNET_VARIANTS \
            else component
        placed = dict(self.component_providers)
        providers = placed.get(component, placed.get(kind))
        if providers is None:
            return self
        from .providers import lookup

        first = lookup(providers.split(",")[0])
        same_first = first == lookup(self.provider.split(",")[0])
        # a shared, per-run or per-stage arena is for device memory: a graph placed on the CPU keeps its own
        arena = self.device_arena if first.device_memory is not None else "per-graph"
        return replace(self, provider=providers, provider_options=self.provider_options if same_first else (),
                       component_providers=(), device_arena=arena)

    def cache_folder(self) -> Path | None:
        """The folder of this run's cache, made if missing; None with the cache off, or where the default
        folder cannot be made (a read-only home: the run goes on uncached). A --cache-dir that cannot be
        made is an error."""
        if self.cache == "off":
            return None
        folder = Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if self.cache_dir is None:
                return None
            raise EdgesdError(f"cannot write the cache folder {folder} ({e.strerror})",
                              "pass a writable --cache-dir, or --cache off") from None
        return folder

    def cache_max_bytes(self) -> int:
        return int(self.cache_max_gb * 1e9)

    def split_guidance(self) -> bool:
        """Whether a guided step runs as two U-Net calls (guidance_batch, with auto resolved; backend chosen)."""
        if self.guidance_batch != "auto":
            return self.guidance_batch == "split"
        if self.backend == "openvino":
            return self.device.strip().upper() == "CPU"
        from .providers import lookup

        unet = self.for_component("unet")
        return lookup(unet.provider.split(",")[0]).name == "cpu"

    def for_backend(self, backend: str) -> "RuntimeOptions":
        """These options with `backend` chosen; an option set for the other backend is an error."""
        other = "openvino" if backend == "onnxruntime" else "onnxruntime"
        defaults = RuntimeOptions()
        for name in _BACKEND_FIELDS[other]:
            if getattr(self, name) != getattr(defaults, name):
                flag = _REPEATED_FLAGS.get(name, "--" + name.replace("_", "-"))
                raise EdgesdError(f"{flag} applies to the {other} backend, not {backend}",
                                  f"drop {flag} or choose --backend {other}")
        return replace(self, backend=backend)


# Fields given as a repeated option, one pair each
_REPEATED_FLAGS = {"provider_options": "--provider-option", "component_providers": "--component-provider"}
# The fields only one backend reads.
_BACKEND_FIELDS = {"onnxruntime": ("provider", "provider_options", "component_providers", "device_arena",
                                   "ort_optimization"),
                   "openvino": ("device", "ov_hint", "ov_precision", "ov_shapes")}


def add_delta(base: np.ndarray, delta, where: str) -> np.ndarray:
    """base + delta (a LoRA's LowRankDelta, made dense here) in base's dtype and shape (a graph may keep a
    weight reshaped)."""
    change = delta.dense()
    if base.size != change.size:
        raise EdgesdError(f"{where}: the graph's weight has {base.size} values, the change {change.size}",
                          "re-export the model")
    change = change.reshape(base.shape)
    change += base  # in place: one weight-sized array at a time
    return change if base.dtype == np.float32 else change.astype(base.dtype)


class Graph(Protocol):
    """One loaded graph. Inputs/outputs are addressed by name, never by position."""

    spec: GraphSpec
    path: Path
    placement: dict[str, int]  # where its nodes run: provider or device -> nodes (a fallback shows as "cpu")

    def input_dtype(self, name: str) -> np.dtype: ...

    def run(self, feeds: dict[str, np.ndarray], local: dict | None = None,
            release: bool = False) -> dict[str, np.ndarray]:
        """Run the graph. `local`: the caller's own state for this graph (one per generation), so callers in
        several threads never share an in-flight request; None: the graph's own (for one thread at a time).
        `release`: the caller's stage ends with this run; a backend set to (--device-arena per-stage) gives
        back the working memory it holds for the graph, others ignore it."""


def fit_feeds(path: Path, feeds: dict[str, np.ndarray], dtypes: dict[str, np.dtype],
              ranks: dict[str, int]) -> dict[str, np.ndarray]:
    """Cast `feeds` to what the graph takes: other exporters' graphs may take int32 ids, int64 timesteps, fp16,
    or (optimum's U-Net) one scalar timestep where ours takes one per batch row."""
    fitted = {}
    for name, value in feeds.items():
        if ranks[name] == 0 and value.ndim == 1:
            if not np.all(value == value[0]):
                raise EdgesdError(f"{path}: input '{name}' is a scalar but the batch has different values")
            value = value[0]
        fitted[name] = np.asarray(value, dtype=dtypes[name], order="C")
    return fitted


def check_names(path: Path, spec: GraphSpec, inputs: set[str], outputs: set[str], exporter_hint: str) -> list[str]:
    """The spec's outputs this graph has, in spec order; raise if the graph does not match the spec."""
    missing = [n for n in spec.input_names if n not in inputs]
    missing += [n for n in spec.output_names[:spec.required_outputs] if n not in outputs]
    extra = sorted(inputs - set(spec.input_names))
    if missing or extra:
        raise EdgesdError(f"{path}: graph does not match the {spec.component} description "
                          f"(missing {missing}, unexpected inputs {extra})", exporter_hint)
    return [n for n in (*spec.output_names, *(t.name for t in spec.added_outputs)) if n in outputs]


def provider_names() -> list[str]:
    from . import onnxruntime_backend

    return onnxruntime_backend.provider_names()


def load_graph(path: Path, spec: GraphSpec, options: RuntimeOptions, weight_deltas: dict | None = None) -> Graph:
    """Load `path` with the backend `options` names (already resolved from "auto"). `weight_deltas`: graph
    constant name -> what to add to it (a LoRA's LowRankDelta), applied to the loaded graph, never to the file."""
    from ..tensor_files import check_graph_files

    check_graph_files(path)  # before any backend opens it: nothing is read from outside the model folder
    if options.backend == "openvino":
        from . import openvino_backend

        return openvino_backend.OvGraph(path, spec, options, weight_deltas)
    if options.backend == "onnxruntime":
        from . import onnxruntime_backend

        return onnxruntime_backend.OrtGraph(path, spec, options, weight_deltas)
    raise ValueError(f"backend {options.backend!r} is not resolved")  # a caller bug: resolve "auto" first
