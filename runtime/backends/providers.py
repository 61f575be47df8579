"""ONNX Runtime's execution providers: one table of those edgesd names, how each is found, and what this
machine has.

A provider is built into the installed onnxruntime package (CPU; CUDA in onnxruntime-gpu; DirectML, CoreML)
or is a plugin EP package (onnxruntime >= 1.24: onnxruntime-ep-webgpu, -openvino, -nv-tensorrt-rtx) whose
library is registered with `register_execution_provider_library` and whose devices come from
`get_ep_devices`; a plugin EP is added to a session per device (`add_provider_for_devices`), never by name.
A provider that is missing or has no device is an error saying what is here and what to install: never a
silent run on the CPU. Where the nodes of a loaded graph run is read back from the session (`placement`).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field

from ..errors import EdgesdError


@dataclass(frozen=True)
class Provider:
    name: str  # what users type: --provider webgpu
    ep_name: str  # ONNX Runtime's name
    install: str  # what adds it
    plugin: str | None = None  # the plugin EP package's module: get_library_path(), get_ep_name()
    needs: str = "a device it supports"  # what its devices need, said when it is installed but finds none
    # OrtValue device type of its memory where graph inputs/outputs can stay between runs (I/O binding)
    device_memory: str | None = None
    defaults: tuple[tuple[str, str], ...] = ()  # its options unless --provider-option says otherwise
    # how a RunOptions arena-shrinkage entry names its memory ("gpu" -> "gpu:0"), where its arena can shrink
    arena_shrinkage: str | None = None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("cpu", "CPUExecutionProvider", "pip install onnxruntime"),
    # The arena grows by what is asked rather than doubling; cuDNN picks convolutions by heuristics with a
    # small workspace: on the H200, SD 1.5 fp16-compute used 6.06 GB instead of 6.93 at the same 0.016 s/step
    # (bench/results/gpu-h200-2026-12-02.md).
    Provider("cuda", "CUDAExecutionProvider", "pip install onnxruntime-gpu (1.31: CUDA 13) in place of onnxruntime",
             device_memory="cuda", defaults=(("arena_extend_strategy", "kSameAsRequested"),
                                             ("cudnn_conv_algo_search", "HEURISTIC"),
                                             ("cudnn_conv_use_max_workspace", "0")), arena_shrinkage="gpu"),
    Provider("tensorrt", "TensorrtExecutionProvider", "pip install onnxruntime-gpu and NVIDIA TensorRT",
             device_memory="cuda"),
    Provider("tensorrt-rtx", "NvTensorRTRTXExecutionProvider", "pip install onnxruntime-ep-nv-tensorrt-rtx",
             plugin="onnxruntime_ep_nv_tensorrt_rtx", needs="an NVIDIA RTX GPU and its driver"),
    Provider("webgpu", "WebGpuExecutionProvider", "pip install onnxruntime-ep-webgpu", plugin="onnxruntime_ep_webgpu",
             needs="a GPU with a Vulkan (Linux; the loader: apt-get install libvulkan1), D3D12 or Metal driver"),
    Provider("openvino", "OpenVINOExecutionProvider",
             "pip install onnxruntime-ep-openvino, or use --backend openvino", plugin="onnxruntime_ep_openvino",
             needs="an Intel CPU, GPU or NPU (or use --backend openvino)"),
    Provider("directml", "DmlExecutionProvider", "pip install onnxruntime-directml (Windows) in place of onnxruntime"),
    Provider("coreml", "CoreMLExecutionProvider", "onnxruntime on macOS has it"),
)}
ALIASES = {"dml": "directml", "trt": "tensorrt", "nv-tensorrt-rtx": "tensorrt-rtx", "gpu": "cuda"}
NO_DEVICE = "installed, but it finds no device"
# OrtValue device type -> the name of its memory in an OrtMemoryInfo (for a shared arena)
ARENA_MEMORY = {"cuda": "Cuda"}
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"  # ONNX Runtime's RunOptions key
# The provider options a shared arena takes over (ONNX Runtime's OrtArenaCfg keys)
ARENA_STRATEGIES = {"kNextPowerOfTwo": 0, "kSameAsRequested": 1}
DEVICE_OPTION = "device"  # --provider-option device=GPU|NPU|<index>: which of a plugin EP's devices


@dataclass(frozen=True)
class Device:
    """One device a provider can run on (from get_ep_devices)."""

    kind: str  # CPU, GPU, NPU
    vendor: str
    name: str  # what the EP calls it (OpenVINO: ov_device), or the vendor again
    handle: object = field(default=None, compare=False, repr=False)  # the OrtEpDevice


@dataclass(frozen=True)
class ProviderStatus:
    provider: Provider
    how: str | None  # "built in", "plugin", or None: not usable here
    devices: tuple[Device, ...] = ()
    reason: str = ""  # why not usable

    @property
    def usable(self) -> bool:
        return self.how is not None

    @property
    def fix(self) -> str:
        return self.provider.needs if self.reason == NO_DEVICE else self.provider.install


@dataclass(frozen=True)
class SessionProviders:
    """How a session gets its providers: the classic `providers=` list, or plugin EP devices."""

    providers: list | None  # InferenceSession(providers=...) when every provider is built in
    devices: tuple[tuple[tuple, dict], ...] = ()  # ((OrtEpDevice, ...), options) per provider, in order
    memory: tuple[str, int] | None = None  # the first provider's (OrtValue device type, device id), if it has one
    shared_arena: bool = False  # the session takes the process's arena for that memory (device_arena shared)
    # RunOptions config entries of a run after which the arena of that memory shrinks to what is in use;
    # per-run: every run's, per-stage: a run's that ends its graph's part of a picture (Graph.run(release=True))
    release_config: tuple[tuple[str, str], ...] = ()
    release_every_run: bool = False

    def apply(self, session_options) -> dict:
        """Set up `session_options`; returns the InferenceSession keyword arguments."""
        for handles, options in self.devices:
            session_options.add_provider_for_devices(list(handles), options)
        if self.shared_arena:
            session_options.add_session_config_entry("session.use_env_allocators", "1")
        return {"providers": self.providers} if self.providers is not None else {}


def lookup(name: str) -> Provider:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in PROVIDERS:
        return PROVIDERS[key]
    full = {p.ep_name.lower(): p for p in PROVIDERS.values()}
    if key in full:
        return full[key]
    raise EdgesdError(f"unknown provider '{name.strip()}'", f"use one of: {', '.join(PROVIDERS)}")


class ProviderRegistry:
    """What one onnxruntime module offers. Plugin libraries are registered once (ONNX Runtime keeps them for
    the process); `ort` and `import_module` are parameters so the tests can give a fake device list."""

    def __init__(self, ort, import_module=importlib.import_module):
        self.ort, self._import = ort, import_module
        self._plugins: dict[str, str | None] = {}  # provider name -> None (registered) or why not
        self._arenas: set[tuple[str, int]] = set()  # (EP name, device id) with a shared arena registered
        self._lock = threading.Lock()

    def _register(self, provider: Provider) -> str | None:
        with self._lock:
            if provider.name not in self._plugins:
                self._plugins[provider.name] = self._try_register(provider)
            return self._plugins[provider.name]

    def _try_register(self, provider: Provider) -> str | None:
        try:
            module = self._import(provider.plugin)
        except ImportError:
            return "not installed"
        if not hasattr(self.ort, "register_execution_provider_library"):
            return f"onnxruntime {getattr(self.ort, '__version__', '?')} has no plugin EP API (1.24 or newer has)"
        try:
            self.ort.register_execution_provider_library(provider.name, module.get_library_path())
        except Exception as e:  # a library that does not load, or needs a newer onnxruntime
            if "already registered" not in str(e).lower():
                return f"its library did not load ({str(e).splitlines()[0][:160]})"
        return None

    def _devices(self, provider: Provider) -> tuple[Device, ...]:
        found = []
        for d in self.ort.get_ep_devices() if hasattr(self.ort, "get_ep_devices") else ():
            if d.ep_name != provider.ep_name:
                continue
            kind = str(d.device.type).rpartition(".")[2]
            metadata = dict(d.ep_metadata or {})
            found.append(Device(kind, d.device.vendor or d.ep_vendor, metadata.get("ov_device", d.device.vendor or kind),
                                d))
        return tuple(found)

    def status(self, provider: Provider) -> ProviderStatus:
        # The plugin package first: once registered, its EP is also in get_available_providers(), but a
        # plugin EP named in providers= is not used (the session runs on the CPU, said nowhere).
        why = self._register(provider) if provider.plugin is not None else "not in this onnxruntime"
        if why is None:
            devices = self._devices(provider)
            if not devices:
                return ProviderStatus(provider, None, reason=NO_DEVICE)
            return ProviderStatus(provider, "plugin", devices)
        if provider.ep_name in self.ort.get_available_providers():
            return ProviderStatus(provider, "built in", self._devices(provider))
        return ProviderStatus(provider, None, reason=why)

    def statuses(self) -> list[ProviderStatus]:
        return [self.status(p) for p in PROVIDERS.values()]

    def share_arena(self, provider: Provider, device_id: int, options: dict) -> None:
        """Register one arena for `provider`'s memory on `device_id`, once per process (ONNX Runtime's env
        allocators), sized and grown as its options say (gpu_mem_limit, arena_extend_strategy)."""
        with self._lock:
            if (provider.ep_name, device_id) in self._arenas:
                return
            strategy = options.get("arena_extend_strategy", "kNextPowerOfTwo")
            if strategy not in ARENA_STRATEGIES:
                raise EdgesdError(f"provider option arena_extend_strategy '{strategy}' is not known",
                                  f"use one of: {', '.join(ARENA_STRATEGIES)}")
            config = {"arena_extend_strategy": ARENA_STRATEGIES[strategy]}
            if "gpu_mem_limit" in options:
                config["max_mem"] = int(options["gpu_mem_limit"])
            info = self.ort.OrtMemoryInfo(ARENA_MEMORY[provider.device_memory], self.ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR,
                                          device_id, self.ort.OrtMemType.DEFAULT)
            self.ort.create_and_register_allocator_v2(provider.ep_name, info, {"device_id": str(device_id)},
                                                      self.ort.OrtArenaCfg(config))
            self._arenas.add((provider.ep_name, device_id))

    def session_providers(self, text: str, first_options: dict, device_arena: str = "auto") -> SessionProviders:
        """`--provider webgpu,cpu` and the first provider's options -> how a session gets them."""
        chosen = list(dict.fromkeys(lookup(name) for name in text.split(",") if name.strip()))
        if not chosen:
            raise EdgesdError("no execution provider given", "use e.g. --provider cpu")
        statuses = [self.status(p) for p in chosen]
        for s in statuses:
            if not s.usable:
                here = ", ".join(x.provider.name for x in self.statuses() if x.usable)
                raise EdgesdError(f"provider '{s.provider.name}' is not available here ({s.reason})",
                                  f"it needs {s.fix}; usable here: {here}" if s.reason == NO_DEVICE else
                                  f"{s.fix}; usable here: {here}")
        options = [{**dict(p.defaults), **(first_options if i == 0 else {})} for i, p in enumerate(chosen)]
        first, device_id = chosen[0], str(options[0].get("device_id", "0"))
        if not device_id.isdigit():
            raise EdgesdError(f"provider option device_id '{device_id}' is not a device number", "e.g. device_id=0")
        memory = None if first.device_memory is None else (first.device_memory, int(device_id))
        release_config = ()
        if device_arena == "auto":
            shrinks = first.arena_shrinkage is not None and statuses[0].how == "built in"
            device_arena = "per-stage" if shrinks else "per-graph"
        if device_arena != "per-graph":
            can = ARENA_MEMORY.get(first.device_memory) if device_arena == "shared" else first.arena_shrinkage
            if can is None or statuses[0].how != "built in":
                raise EdgesdError(f"--device-arena {device_arena} is for a provider with its own memory, not "
                                  f"'{first.name}'", "use it with --provider cuda, or leave --device-arena auto")
            if device_arena == "shared":
                self.share_arena(first, int(device_id), options[0])
            else:
                release_config = ((ARENA_SHRINKAGE, f"{first.arena_shrinkage}:{device_id}"),)
        if all(s.how == "built in" for s in statuses):
            return SessionProviders([(s.provider.ep_name, o) if o else s.provider.ep_name
                                     for s, o in zip(statuses, options)], memory=memory,
                                    shared_arena=device_arena == "shared", release_config=release_config,
                                    release_every_run=device_arena == "per-run")
        devices = []
        for s, o in zip(statuses, options):
            if not s.devices:  # a built-in provider that lists no device cannot be mixed with plugin EPs
                raise EdgesdError(f"provider '{s.provider.name}' cannot be combined with plugin EPs here",
                                  f"run it on its own: --provider {s.provider.name}")
            devices.append((_pick(s, o.pop(DEVICE_OPTION, None)), o))
        return SessionProviders(None, tuple(devices), memory)


def _pick(status: ProviderStatus, wanted: str | None) -> tuple:
    """The device of one provider a session gets: the EP's first, or the one `wanted` names (index or kind)."""
    devices = status.devices
    if wanted is None:  # a plugin EP lists its preferred device first
        return (devices[0].handle,)
    if wanted.isdigit() and int(wanted) < len(devices):
        return (devices[int(wanted)].handle,)
    match = [d.handle for d in devices if wanted.upper() in (d.kind.upper(), d.name.upper())]
    if not match:
        names = ", ".join(f"{i}: {d.kind} {d.name}" for i, d in enumerate(devices))
        raise EdgesdError(f"provider '{status.provider.name}' has no device '{wanted}'", f"its devices: {names}")
    return tuple(match[:1])


def placement(session) -> dict[str, int]:
    """Nodes per execution provider of a loaded session (recorded when the session was made, see OrtGraph)."""
    counts: dict[str, int] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        name = next((p.name for p in PROVIDERS.values() if p.ep_name == subgraph.ep_name), subgraph.ep_name)
        counts[name] = counts.get(name, 0) + len(subgraph.get_nodes())
    return counts
