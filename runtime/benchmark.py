"""Measuring a model's speed and memory per backend / provider: `edgesd bench MODEL`, and the measuring code
the scripts under bench/ use (one implementation).

Each configuration runs in a fresh process (`python -m edgesd.benchmark`), so its load time and peak
memory are its own: it loads the model, makes one warm-up picture (ONNX Runtime's first-run set-up,
OpenVINO's compile for the size), then one measured picture whose timings come from the run context.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backends.base import RuntimeOptions
from .errors import EdgesdError

PROMPT = "a photograph of an astronaut riding a horse"
COLUMNS = [("label", "configuration", "{}"), ("load_s", "load s", "{:.2f}"), ("first_s", "first s", "{:.2f}"),
           ("text_encoder_s", "text enc s", "{:.3f}"), ("unet_s_per_step", "U-Net s/step", "{:.3f}"),
           ("vae_s", "VAE s", "{:.3f}"), ("total_s", "total s", "{:.2f}"), ("peak_rss_gb", "peak RSS GB", "{:.2f}"),
           ("peak_device_gb", "peak GPU GB", "{:.2f}")]


@dataclass(frozen=True)
class BenchTarget:
    """One configuration: a model folder and how to run it."""

    model: Path
    label: str
    options: dict = field(default_factory=dict)  # RuntimeOptions fields (JSON-able: sent to the child process)


@dataclass(frozen=True)
class BenchSettings:
    steps: int = 20
    width: int | None = None  # None: the model's
    height: int | None = None
    guidance: float | None = None  # None: the model's
    seed: int = 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss alone: Linux carries that over
    exec from the parent, so a child of a large process would report the parent's size."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class SmiReader:
    """GPU memory from nvidia-smi, one process call per reading (tens of ms: a short peak can fall between)."""

    source, interval = "nvidia-smi", 0.05
    QUERY = {"process": ["--query-compute-apps=pid,used_memory"], "card": ["--query-gpu=memory.used"]}

    @classmethod
    def _read(cls, what: str) -> list[list[str]]:
        try:
            out = subprocess.run(["nvidia-smi", *cls.QUERY[what], "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines() if line.strip()]

    def process_bytes(self, pid: int) -> int:  # 0 where nvidia-smi lists no such process
        return sum(int(row[1]) for row in self._read("process") if len(row) == 2 and row[0] == str(pid)
                   and row[1].isdigit()) * 2**20

    def card_bytes(self) -> int:  # summed over the cards
        return sum(int(row[0]) for row in self._read("card") if row and row[0].isdigit()) * 2**20


class NvmlReader:
    """GPU memory from NVIDIA's management library (what nvidia-smi reads) through ctypes: a reading takes
    well under a millisecond, so polling every 2 ms sees the VAE decode's peak of a few tens of ms."""

    source, interval = "nvml", 0.002
    NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE

    class _Memory(ctypes.Structure):  # nvmlMemory_t
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    class _Process(ctypes.Structure):  # nvmlProcessInfo_t
        _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                    ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]

    def __init__(self):
        self._lib = ctypes.CDLL("libnvidia-ml.so.1")  # OSError where there is no NVIDIA driver
        if self._lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        count = ctypes.c_uint()
        self._lib.nvmlDeviceGetCount_v2(ctypes.byref(count))
        self._devices = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            if self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(handle)) == 0:
                self._devices.append(handle)
        self._processes = getattr(self._lib, "nvmlDeviceGetComputeRunningProcesses_v3", None) \
            or self._lib.nvmlDeviceGetComputeRunningProcesses_v2

    def process_bytes(self, pid: int) -> int:
        total = 0
        for handle in self._devices:
            table = (self._Process * 256)()
            count = ctypes.c_uint(256)
            if self._processes(handle, ctypes.byref(count), table) != 0:
                continue
            total += sum(p.usedGpuMemory for p in table[:count.value]
                         if p.pid == pid and p.usedGpuMemory != self.NOT_AVAILABLE)
        return total

    def card_bytes(self) -> int:
        total = 0
        for handle in self._devices:
            memory = self._Memory()
            if self._lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
                total += memory.used
        return total


def device_reader() -> SmiReader | NvmlReader | None:
    """NVML where its library loads, else nvidia-smi where it is on PATH, else None (no NVIDIA GPU)."""
    try:
        return NvmlReader()
    except (OSError, AttributeError):
        return SmiReader() if shutil.which("nvidia-smi") else None


class DeviceMemory:
    """Peak NVIDIA GPU memory while a block runs, polled in a thread (`reader`: NVML, or nvidia-smi): this
    process's own where the driver lists it (`how` "process"), else the whole card's less its reading at the
    start ("card": in a container the driver may not see our process ids). `peak_gb` is None without an
    NVIDIA GPU (other GPUs' memory is not read)."""

    def __init__(self, interval: float | None = None, reader: SmiReader | NvmlReader | None = None):
        self.reader = reader if reader is not None else device_reader()
        self.available = self.reader is not None
        self.interval = interval if interval is not None else getattr(self.reader, "interval", 0.05)
        self.base = self.reader.card_bytes() if self.available else 0
        self.peak = {"process": 0, "card": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def process_gb() -> float:
        """This process's GPU memory now (0 where the driver lists none)."""
        reader = device_reader()
        return 0.0 if reader is None else round(reader.process_bytes(os.getpid()) / 1e9, 2)

    def _poll(self):
        pid = os.getpid()
        while not self._stop.is_set():
            self.peak["process"] = max(self.peak["process"], self.reader.process_bytes(pid))
            self.peak["card"] = max(self.peak["card"], self.reader.card_bytes() - self.base)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def how(self) -> str | None:
        return None if not self.available else "process" if self.peak["process"] else "card"

    @property
    def source(self) -> str | None:
        return getattr(self.reader, "source", None)

    @property
    def peak_gb(self) -> float | None:
        return None if self.how is None else round(self.peak[self.how] / 1e9, 2)


def measure_graphs(pipe, unet_runs: int, latent_side: int = 64) -> dict:
    """The graph-level protocol of bench/: the text encoder twice, the U-Net `unet_runs` + 1 times at batch 2
    (the first call apart), the VAE decoder three times; median seconds of the later calls."""
    import numpy as np

    ids = pipe.tokenizer([PROMPT, ""])
    rng = np.random.default_rng(0)
    channels = pipe.constants.latent_channels
    unet_feeds = {"sample": rng.standard_normal((2, channels, latent_side, latent_side), dtype=np.float32),
                  "timestep": np.array([500.0, 500.0], np.float32)}

    def timed(fn, n):
        times, out = [], None
        for _ in range(n):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return times, out

    te_times, hidden = timed(lambda: pipe.graphs["text_encoder"].run({"input_ids": ids}), 2)
    unet_feeds["encoder_hidden_states"] = hidden["last_hidden_state"]
    unet_times, _ = timed(lambda: pipe.graphs["unet"].run(unet_feeds), unet_runs + 1)
    latent = rng.standard_normal((1, channels, latent_side, latent_side), dtype=np.float32)
    vae_times, _ = timed(lambda: pipe.graphs["vae_decoder"].run({"latent_sample": latent}), 3)
    compile_s = sum(getattr(g, "compile_seconds", 0.0) for g in pipe.graphs.values())
    return {"compile_s": round(compile_s, 2), "text_encoder_s": round(te_times[-1], 3),
            "unet_first_call_s": round(unet_times[0], 2),
            "unet_s_per_step": round(float(np.median(unet_times[1:] or unet_times)), 3),
            "vae_decode_s": round(float(np.median(vae_times[1:])), 3),
            "peak_rss_gb": round(peak_rss_bytes() / 1e9, 2)}


def measure_generation(target: BenchTarget, settings: BenchSettings) -> dict:
    """One configuration, in this process: load, a warm-up picture, a measured picture."""
    from .pipeline import Pipeline

    with DeviceMemory() as device:
        start = time.perf_counter()
        pipe = Pipeline.load(target.model, RuntimeOptions(**_options(target.options)))
        load_s = time.perf_counter() - start
        args = dict(num_inference_steps=settings.steps, width=settings.width, height=settings.height,
                    guidance_scale=settings.guidance, seed=settings.seed)
        first = pipe(PROMPT, **{**args, "num_inference_steps": 1}).timings["total_s"]
        result = pipe(PROMPT, **args)
    t = result.timings
    steps = max(1, result.parameters["steps"])
    return {"load_s": round(load_s, 2), "first_s": round(first, 2),
            "text_encoder_s": round(t.get("text_encoder_s", 0.0) + t.get("text_encoder_2_s", 0.0), 3),
            "unet_s_per_step": round(t["unet_s"] / steps, 3), "unet_evaluations": t["unet_evaluations"],
            "unet_calls": t["unet_calls"],
            "vae_s": round(t.get("vae_decoder_s", 0.0), 3), "total_s": round(t["total_s"], 2),
            "peak_rss_gb": round(peak_rss_bytes() / 1e9, 2),
            "peak_device_gb": device.peak_gb, "device_memory_of": device.how,
            "placement": {name: nodes for name, nodes in pipe.placement().items() if name != "vae_encoder"},
            "size": f"{result.parameters['width']}x{result.parameters['height']}", "steps": steps,
            "guidance": result.parameters["guidance_scale"]}


def _options(values: dict) -> dict:
    out = dict(values)
    if "provider_options" in out:
        out["provider_options"] = tuple(tuple(pair) for pair in out["provider_options"])
    return out


def measure_in_child(target: BenchTarget, settings: BenchSettings, timeout: float = 3600) -> dict:
    """measure_generation in a fresh process; {"error": "..."} where the configuration fails."""
    request = json.dumps({"target": {**asdict(target), "model": str(target.model)}, "settings": asdict(settings)})
    try:
        done = subprocess.run([sys.executable, "-m", "edgesd.benchmark", request], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"took longer than {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": reason.removeprefix("error: ")[:240]}
    return json.loads(lines[-1])


def targets(models: list[Path], providers: list[str] | None, backends: list[str] | None) -> list[BenchTarget]:
    """Every model x every usable configuration: ONNX Runtime per provider (default: each usable one) and
    OpenVINO per device (where installed; a folder of IR graphs runs on OpenVINO only)."""
    from .devices import describe_devices
    from .model import ModelFolder
    from .pipeline import resolve_backend

    summary = describe_devices()
    usable = [p["name"] for p in summary["onnxruntime"].get("providers", []) if p["usable"]]
    if providers:  # one asked for that is not here is said now, not as a failed row
        from .backends.onnxruntime_backend import REGISTRY

        for provider in providers:
            REGISTRY.session_providers(provider, {})
    out = []
    for model in models:
        folder = ModelFolder.open(model)
        only_openvino = resolve_backend(folder, "auto") == "openvino"
        wanted = backends or (["openvino"] if only_openvino else ["onnxruntime", "openvino"])
        for backend in wanted:
            if backend == "onnxruntime" and not only_openvino:
                for provider in providers or usable:
                    out.append(BenchTarget(model, f"{folder.root.name} onnxruntime {provider}",
                                           {"backend": "onnxruntime", "provider": provider}))
            elif backend == "openvino" and summary["openvino"]["version"] is not None:
                for device in [d["name"] for d in summary["openvino"]["devices"]]:
                    out.append(BenchTarget(model, f"{folder.root.name} openvino {device}",
                                           {"backend": "openvino", "device": device}))
            elif backend not in ("onnxruntime", "openvino"):
                raise EdgesdError(f"unknown backend '{backend}'", "use onnxruntime or openvino")
    if not out:
        raise EdgesdError("nothing to measure: no usable backend for these models", "see `edgesd devices`")
    return out


def table(rows: list[dict]) -> list[str]:
    widths = [max(len(title), *(len(_cell(r, key, fmt)) for r in rows)) + 2 for key, title, fmt in COLUMNS]
    lines = ["".join(title.ljust(w) for (_, title, _), w in zip(COLUMNS, widths))]
    for row in rows:
        if "error" in row:
            lines.append(row["label"].ljust(widths[0]) + "error: " + row["error"])
        else:
            lines.append("".join(_cell(row, key, fmt).ljust(w) for (key, _, fmt), w in zip(COLUMNS, widths)))
    return lines


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def chart(rows: list[dict], path: Path, title: str) -> None:
    """A bar chart of each configuration's total seconds (Pillow only: the runtime has no plotting library)."""
    from PIL import Image, ImageDraw

    done = [r for r in rows if "error" not in r]
    if not done:
        return
    width, bar, left, top = 900, 28, 320, 48
    image = Image.new("RGB", (width, top + bar * len(done) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 12), title, fill="black")
    longest = max(r["total_s"] for r in done) or 1.0
    for i, row in enumerate(done):
        y = top + i * bar
        draw.text((10, y + 8), row["label"][:48], fill="black")
        length = int((width - left - 90) * row["total_s"] / longest)
        draw.rectangle([left, y + 4, left + max(1, length), y + bar - 4], fill=(60, 110, 180))
        draw.text((left + length + 6, y + 8), f"{row['total_s']:.2f} s", fill="black")
    image.save(path)


def _child(request: str) -> None:
    values = json.loads(request)
    target = values["target"]
    try:
        row = measure_generation(BenchTarget(Path(target["model"]), target["label"], target["options"]),
                                 BenchSettings(**values["settings"]))
    except EdgesdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(row))


if __name__ == "__main__":
    _child(sys.argv[1])
