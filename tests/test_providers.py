"""Execution providers: the registry against a fake onnxruntime (built-in providers, plugin EP packages, their
devices), the one-line errors for a missing provider or device, `edgesd devices`, and where a loaded graph's
nodes run."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

import edgesd
from edgesd.backends.providers import PROVIDERS, ProviderRegistry, lookup
from edgesd.errors import EdgesdError

from .commands import edgesd as run_edgesd


class _Hardware:
    def __init__(self, kind: str, vendor: str):
        self.type, self.vendor = f"OrtHardwareDeviceType.{kind}", vendor


class _EpDevice:
    def __init__(self, ep_name: str, kind: str, vendor: str, **metadata):
        self.ep_name, self.ep_vendor, self.ep_metadata = ep_name, vendor, metadata
        self.device = _Hardware(kind, vendor)


class FakeOrt:
    """The parts of onnxruntime the registry reads; plugin libraries 'load' when their path is known."""

    __version__ = "1.32.0"

    def __init__(self, built_in: list[str], plugin_devices: dict[str, list[_EpDevice]], broken: set[str] = frozenset()):
        self.built_in, self.plugin_devices, self.broken = built_in, plugin_devices, broken
        self.registered: list[str] = []

    def get_available_providers(self):  # as onnxruntime does: registered plugin EPs are listed too
        plugins = [d.ep_name for name in self.registered for d in self.plugin_devices.get(name, [])]
        return list(dict.fromkeys([*self.built_in, *plugins]))

    def register_execution_provider_library(self, name, path):
        if path in self.broken:
            raise RuntimeError("ORT runtime version is below the minimum required version")
        if name in self.registered:
            raise RuntimeError(f"library {name} is already registered")
        self.registered.append(name)

    def get_ep_devices(self):
        devices = [_EpDevice("CPUExecutionProvider", "CPU", "AMD")]
        for name in self.registered:
            devices += self.plugin_devices.get(name, [])
        return devices


def _modules(*installed: str):
    def import_module(name):
        if name not in installed:
            raise ImportError(name)
        return types.SimpleNamespace(get_library_path=lambda: f"/lib/{name}.so")
    return import_module


class _SessionOptions:
    def __init__(self):
        self.added = []

    def add_provider_for_devices(self, devices, options):
        self.added.append((devices, options))


WEBGPU = _EpDevice("WebGpuExecutionProvider", "GPU", "NVIDIA")
OV_DEVICES = [_EpDevice("OpenVINOExecutionProvider", "CPU", "Intel", ov_device="CPU"),
              _EpDevice("OpenVINOExecutionProvider", "NPU", "Intel", ov_device="NPU")]


def _registry(built_in=("CPUExecutionProvider",), installed=(), devices=None, broken=frozenset()):
    ort = FakeOrt(list(built_in), devices or {}, broken)
    return ProviderRegistry(ort, _modules(*installed)), ort


def test_short_names_aliases_and_full_names():
    assert lookup("CPU").ep_name == "CPUExecutionProvider"
    assert lookup("dml").name == "directml" and lookup("trt").name == "tensorrt"
    assert lookup("WebGpuExecutionProvider").name == "webgpu"
    with pytest.raises(EdgesdError, match="unknown provider 'tpu'; use one of: cpu, cuda"):
        lookup("tpu")


def test_built_in_providers_are_a_providers_list_with_the_first_ones_options():
    registry, _ = _registry(built_in=["CUDAExecutionProvider", "CPUExecutionProvider"])
    chosen = registry.session_providers("cuda, cpu", {"device_id": "1"})
    assert chosen.providers == [("CUDAExecutionProvider", {**dict(PROVIDERS["cuda"].defaults), "device_id": "1"}),
                                "CPUExecutionProvider"]
    assert chosen.apply(_SessionOptions()) == {"providers": chosen.providers}


def test_a_plugin_ep_is_registered_once_and_added_by_device():
    registry, ort = _registry(installed=["onnxruntime_ep_webgpu"], devices={"webgpu": [WEBGPU]})
    chosen = registry.session_providers("webgpu,cpu", {"preferredLayout": "NHWC"})
    session_options = _SessionOptions()
    assert chosen.apply(session_options) == {}  # no providers= list: the devices carry them
    assert [(devices[0].ep_name, options) for devices, options in session_options.added] == [
        ("WebGpuExecutionProvider", {"preferredLayout": "NHWC"}), ("CPUExecutionProvider", {})]
    again = registry.session_providers("webgpu", {})  # now listed as available too: still added by device
    assert again.providers is None and len(again.devices) == 1
    assert ort.registered == ["webgpu"]  # registered once per process


def test_a_device_is_chosen_by_kind_or_index():
    registry, _ = _registry(installed=["onnxruntime_ep_openvino"], devices={"openvino": OV_DEVICES})
    (devices, options), = registry.session_providers("openvino", {"device": "NPU", "num_streams": "1"}).devices
    assert devices[0].device.type.endswith("NPU") and options == {"num_streams": "1"}
    (devices, _), = registry.session_providers("openvino", {"device": "0"}).devices
    assert devices[0].ep_metadata["ov_device"] == "CPU"
    (devices, _), = registry.session_providers("openvino", {}).devices
    assert devices[0].ep_metadata["ov_device"] == "CPU"  # the EP's first
    with pytest.raises(EdgesdError, match="has no device 'GPU'; its devices: 0: CPU CPU, 1: NPU NPU"):
        registry.session_providers("openvino", {"device": "GPU"})


@pytest.mark.parametrize("setup, provider, needles", [
    (dict(), "webgpu", ["'webgpu' is not available here (not installed)", "pip install onnxruntime-ep-webgpu",
                        "usable here: cpu"]),
    (dict(installed=["onnxruntime_ep_webgpu"]), "webgpu", ["finds no device", "Vulkan"]),
    (dict(installed=["onnxruntime_ep_webgpu"], broken={"/lib/onnxruntime_ep_webgpu.so"}), "webgpu",
     ["its library did not load", "minimum required version"]),
    (dict(), "cuda", ["'cuda' is not available here (not in this onnxruntime)", "onnxruntime-gpu"]),
    (dict(), "cpu,coreml", ["'coreml' is not available"]),
    (dict(built_in=["CPUExecutionProvider", "DmlExecutionProvider"], installed=["onnxruntime_ep_webgpu"],
          devices={"webgpu": [WEBGPU]}), "webgpu,directml", ["'directml' cannot be combined with plugin EPs"]),
    (dict(), " , ", ["no execution provider given"]),
])
def test_a_missing_provider_or_device_is_one_line_never_the_cpu(setup, provider, needles):
    registry, _ = _registry(**setup)
    with pytest.raises(EdgesdError) as error:
        registry.session_providers(provider, {})
    for needle in needles:
        assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_statuses_cover_every_provider_in_the_table():
    registry, _ = _registry(installed=["onnxruntime_ep_webgpu"], devices={"webgpu": [WEBGPU]})
    statuses = {s.provider.name: s for s in registry.statuses()}
    assert list(statuses) == list(PROVIDERS)
    assert statuses["webgpu"].how == "plugin" and statuses["webgpu"].devices[0].kind == "GPU"
    assert statuses["cpu"].how == "built in"
    assert not statuses["cuda"].usable and "onnxruntime-gpu" in statuses["cuda"].fix


def test_a_real_session_reports_where_its_nodes_run():
    pipe = edgesd.Pipeline.load()
    placement = pipe.placement()
    assert set(placement) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert set(placement["unet"]) == {"cpu"} and placement["unet"]["cpu"] > 100


def test_an_unavailable_provider_on_the_command_line(tmp_path):
    run = run_edgesd("generate", "x", "--provider", "cuda", "-o", tmp_path / "a.png")
    assert run.returncode == 2 and run.stderr.count("error:") == 1
    assert "provider 'cuda' is not available here" in run.stderr and not (tmp_path / "a.png").exists()


def test_edgesd_devices_lists_backends_providers_and_what_to_install():
    run = run_edgesd("devices")
    assert run.returncode == 0, run.stderr
    assert "onnxruntime" in run.stdout and "cpu" in run.stdout and "pip install onnxruntime-ep-webgpu" in run.stdout
    summary = json.loads(run_edgesd("devices", "--json").stdout)
    cpu = next(p for p in summary["onnxruntime"]["providers"] if p["name"] == "cpu")
    assert cpu["usable"] and cpu["devices"][0]["kind"] == "CPU"
    if summary["openvino"]["version"] is not None:
        assert "CPU" in [d["name"] for d in summary["openvino"]["devices"]]


def test_info_run_prints_each_graphs_placement():
    run = run_edgesd("info", edgesd.models_path.default_model_path(), "--run")
    assert run.returncode == 0, run.stderr
    assert "unet" in run.stdout and "runs on: cpu" in run.stdout


def test_edgesd_bench_measures_the_default_model_per_backend(tmp_path):
    """`edgesd bench` on the embedded model: the CPU EP and OpenVINO, each in its own process."""
    pytest.importorskip("openvino")
    model = edgesd.models_path.default_model_path()
    run = run_edgesd("bench", model, "--steps", 3, "--json", tmp_path / "b.json", "--chart", tmp_path / "b.png")
    assert run.returncode == 0, run.stderr
    assert "U-Net s/step" in run.stdout and "onnxruntime cpu" in run.stdout and "openvino CPU" in run.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["options"]["backend"] for r in rows] == ["onnxruntime", "openvino"]
    for row in rows:
        assert "error" not in row, row
        assert row["steps"] == 3 and row["size"] == "64x64" and row["unet_s_per_step"] > 0
        assert row["total_s"] >= row["unet_s_per_step"] and 0 < row["peak_rss_gb"] < 8
        assert row["peak_device_gb"] is None  # no NVIDIA GPU here
    assert "peak GPU GB" in run.stdout
    assert rows[0]["placement"]["unet"] == {"cpu": rows[0]["placement"]["unet"]["cpu"]}
    from PIL import Image

    assert Image.open(tmp_path / "b.png").size[0] == 900


@pytest.mark.parametrize("args, needle", [
    (["--size", "big"], "is not WIDTHxHEIGHT"),
    (["--size", "60x60"], "60"),
    (["--steps", "0"], "--steps must be"),
    (["--providers", "cuda"], "cuda"),
    (["--backends", "tpu"], "unknown backend 'tpu'"),
    (["--json", "/nowhere/b.json"], "does not exist"),
])
def test_bad_bench_options_are_one_line(args, needle):
    run = run_edgesd("bench", edgesd.models_path.default_model_path(), *args)
    assert run.returncode == 2 and run.stderr.count("error:") == 1, run.stderr
    assert needle in run.stderr


def test_a_failing_configuration_is_a_row_with_its_error():
    from edgesd.benchmark import BenchSettings, BenchTarget, measure_in_child

    row = measure_in_child(BenchTarget(edgesd.models_path.default_model_path(), "x", {"provider": "cuda"}),
                           BenchSettings(steps=1))
    assert "provider 'cuda' is not available" in row["error"]


def test_io_binding_is_asked_for_providers_with_their_own_memory():
    registry = ProviderRegistry(FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"], {}), _modules())
    assert registry.session_providers("cuda,cpu", {"device_id": "1"}).memory == ("cuda", 1)
    assert registry.session_providers("cpu", {}).memory is None
    with pytest.raises(EdgesdError, match="device_id 'x' is not a device number"):
        registry.session_providers("cuda", {"device_id": "x"})


def test_io_binding_keeps_repeated_inputs_in_device_memory(monkeypatch):
    """The bound path on ONNX Runtime's own CPU memory (CI has no GPU): the prompt's embeddings are copied
    once per picture, not once per step (split guidance: each half once), and the pictures equal the plain
    run's bit for bit."""
    import dataclasses

    import numpy as np
    import onnxruntime as ort

    from edgesd.backends import providers

    monkeypatch.setitem(providers.PROVIDERS, "cpu", dataclasses.replace(PROVIDERS["cpu"], device_memory="cpu"))
    made = []
    real = ort.OrtValue.ortvalue_from_numpy

    def counting(value, *args):
        made.append(value.shape)
        return real(value, *args)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(counting))
    run = dict(num_inference_steps=4, guidance_scale=3.0, seed=2)
    bound = edgesd.Pipeline.load(cache="off", guidance_batch="joint")("a red circle", **run)
    unet_inputs = [shape for shape in made if len(shape) == 3 and shape[1] == 77]  # encoder_hidden_states
    assert unet_inputs == [(2, 77, 128)] and bound.timings["unet_calls"] >= 4
    made.clear()
    split = edgesd.Pipeline.load(cache="off", guidance_batch="split")("a red circle", **run)
    unet_inputs = [shape for shape in made if len(shape) == 3 and shape[1] == 77]
    assert unet_inputs == [(1, 77, 128)] * 2 and split.timings["unet_calls"] >= 8
    assert np.array_equal(split.latents, bound.latents)
    made.clear()
    plain = edgesd.Pipeline.load(cache="off", io_binding="off")("a red circle", **run)
    assert not made
    assert np.array_equal(np.asarray(bound.images[0]), np.asarray(plain.images[0]))


def test_out_of_device_memory_is_one_line_saying_so():
    """What the CUDA EP raised on the GPU machine with gpu_mem_limit at 4 GB, said as one line with a fix."""
    pipe = edgesd.Pipeline.load(cache="off")
    graph = pipe.graph("vae_decoder")

    class Exhausted:
        def run(self, *args):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                               "running Softmax node. Status Message: /onnxruntime_src/onnxruntime/core/framework/"
                               "bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal Failed to "
                               "allocate memory for requested buffer of size 1073741824")

    graph._session = Exhausted()
    with pytest.raises(EdgesdError, match=r"ran out of memory on inputs .*\(provider cpu\)") as caught:
        pipe("a red circle", num_inference_steps=1, seed=1)
    assert "gpu_mem_limit" in str(caught.value) and "\n" not in str(caught.value)


def _fake_nvidia_smi(folder, process_rows: str, card_mib: int):
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      f'case "$1" in --query-compute-apps*) printf "{process_rows}" ;; *) echo {card_mib} ;; esac\n')
    script.chmod(0o755)


@pytest.mark.parametrize("listed, want_how", [(True, "process"), (False, "card")])
def test_device_memory_reads_the_process_or_else_the_card(tmp_path, monkeypatch, listed, want_how):
    """edgesd bench's GPU column (and bench/gpu.py's): nvidia-smi's line for this process where it has one,
    else the card's memory less its reading at the start (a container may hide our process ids)."""
    import os
    import time

    from edgesd.benchmark import DeviceMemory, SmiReader

    rows = f"{os.getpid()}, 1500\\n{os.getpid() + 1}, 9000\\n" if listed else "77, 9000\\n"
    _fake_nvidia_smi(tmp_path, rows, 2000)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with DeviceMemory(interval=0.01, reader=SmiReader()) as memory:
        _fake_nvidia_smi(tmp_path, rows.replace("1500", "3000"), 2600)  # the card's use grows by 600 MiB
        time.sleep(0.3)
    assert memory.how == want_how
    assert memory.peak_gb == (round(3000 * 2**20 / 1e9, 2) if listed else round(600 * 2**20 / 1e9, 2))


def test_cuda_gets_its_lean_defaults_and_the_users_options_win():
    registry = ProviderRegistry(FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"], {}), _modules())
    cuda, cpu = registry.session_providers("cuda,cpu", {"cudnn_conv_algo_search": "EXHAUSTIVE"}).providers
    assert cuda == ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested",
                                              "cudnn_conv_algo_search": "EXHAUSTIVE",
                                              "cudnn_conv_use_max_workspace": "0"})
    assert cpu == "CPUExecutionProvider"


class _ArenaOrt(FakeOrt):
    """FakeOrt with the env-allocator API: records each arena registered."""

    OrtAllocatorType = types.SimpleNamespace(ORT_ARENA_ALLOCATOR="arena")
    OrtMemType = types.SimpleNamespace(DEFAULT="default")

    def __init__(self):
        super().__init__(["CUDAExecutionProvider", "CPUExecutionProvider"], {})
        self.arenas = []

    def OrtMemoryInfo(self, name, allocator, device_id, mem_type):  # noqa: N802 (onnxruntime's names)
        return (name, allocator, device_id, mem_type)

    def OrtArenaCfg(self, config):  # noqa: N802
        return dict(config)

    def create_and_register_allocator_v2(self, ep_name, info, options, config):
        self.arenas.append((ep_name, info, options, config))


class _ConfigOptions(_SessionOptions):
    def __init__(self):
        super().__init__()
        self.config = {}

    def add_session_config_entry(self, key, value):
        self.config[key] = value


def test_a_shared_device_arena_is_registered_once_and_taken_by_each_session():
    ort = _ArenaOrt()
    registry = ProviderRegistry(ort, _modules())
    for _ in range(3):  # text encoder, U-Net, VAE: one arena
        chosen = registry.session_providers("cuda", {"gpu_mem_limit": "4000000000"}, "shared")
        made = _ConfigOptions()
        chosen.apply(made)
        assert made.config == {"session.use_env_allocators": "1"}
    assert ort.arenas == [("CUDAExecutionProvider", ("Cuda", "arena", 0, "default"), {"device_id": "0"},
                           {"arena_extend_strategy": 1, "max_mem": 4000000000})]
    made = _ConfigOptions()
    registry.session_providers("cuda", {}, "per-graph").apply(made)  # the session's own arena
    assert made.config == {}
    with pytest.raises(EdgesdError, match="--device-arena shared is for a provider with its own memory, not 'cpu'"):
        registry.session_providers("cpu", {}, "shared")
    with pytest.raises(EdgesdError, match="arena_extend_strategy 'kDoubling' is not known"):
        registry.session_providers("cuda", {"arena_extend_strategy": "kDoubling", "device_id": "1"}, "shared")


def test_a_per_run_or_per_stage_device_arena_shrinks_after_runs():
    ort = _ArenaOrt()
    registry = ProviderRegistry(ort, _modules())
    chosen = registry.session_providers("cuda", {"device_id": "1"}, "per-run")
    made = _ConfigOptions()
    chosen.apply(made)
    assert chosen.release_config == (("memory.enable_memory_arena_shrinkage", "gpu:1"),)
    assert chosen.release_every_run
    assert made.config == {} and ort.arenas == []  # the session keeps its own arena, shrunk at each run's end
    staged = registry.session_providers("cuda", {}, "per-stage")  # only the runs that end a stage
    assert staged.release_config == (("memory.enable_memory_arena_shrinkage", "gpu:0"),)
    assert not staged.release_every_run
    assert registry.session_providers("cuda", {}, "per-graph").release_config == ()  # arenas as they grew
    auto = registry.session_providers("cuda", {})  # the default: per-stage where the arena can shrink
    assert auto.release_config == staged.release_config and not auto.release_every_run
    assert registry.session_providers("cpu", {}).release_config == ()  # elsewhere per-graph, no error
    for arena in ("per-run", "per-stage"):
        with pytest.raises(EdgesdError, match=f"--device-arena {arena} is for a provider with its own memory, not 'cpu'"):
            registry.session_providers("cpu", {}, arena)
        placed = edgesd.RuntimeOptions(provider="cuda", device_arena=arena,
                                       component_providers=(("text_encoder", "cpu"),))
        assert placed.for_component("text_encoder").device_arena == "per-graph"


class _SessionRecorder:
    """An InferenceSession stand-in that records the RunOptions of each run and runs the real one."""

    def __init__(self, session):
        self.session, self.run_options = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, outputs, feeds, run_options=None):
        self.run_options.append(run_options)
        return self.session.run(outputs, feeds)


@pytest.mark.parametrize("every_run", [False, True])
def test_an_onnxruntime_graph_shrinks_its_arena_after_the_runs_its_arena_mode_says(every_run):
    from edgesd.backends import onnxruntime_backend

    pipe = edgesd.Pipeline.load()
    graph = onnxruntime_backend.OrtGraph(pipe.graphs["vae_decoder"].path, pipe.specs["vae_decoder"],
                                         edgesd.RuntimeOptions())
    assert graph._release_options is None  # the CPU provider: no device arena, nothing to shrink
    shrink = object()  # what a cuda session's per-run / per-stage options would hold
    graph._release_options, graph._release_every_run = shrink, every_run
    graph._session = recorder = _SessionRecorder(graph._session)
    z = np.zeros((1, 4, 8, 8), np.float32)
    graph.run({"latent_sample": z})
    graph.run({"latent_sample": z}, release=True)
    assert recorder.run_options == [shrink if every_run else None, shrink]


def test_a_component_runs_on_its_own_provider():
    from edgesd import RuntimeOptions

    options = RuntimeOptions(provider="cuda,cpu", provider_options=(("device_id", "1"),),
                             component_providers=(("text_encoder", "cpu"),), guidance_batch="auto")
    text = options.for_component("text_encoder_2")  # every text encoder
    assert (text.provider, text.provider_options, text.component_providers) == ("cpu", (), ())
    assert options.for_component("unet") is options
    shared = RuntimeOptions(provider="cuda", device_arena="shared", component_providers=(("text_encoder", "cpu"),))
    assert shared.for_component("text_encoder").device_arena == "per-graph"  # the CPU has no device arena
    assert shared.for_component("unet").device_arena == "shared"
    assert not options.split_guidance()  # the U-Net is on the GPU: joint
    on_cpu = RuntimeOptions(provider="cuda", component_providers=(("unet", "cpu"),))
    assert on_cpu.split_guidance()
    same = RuntimeOptions(provider="cuda", provider_options=(("device_id", "1"),),
                          component_providers=(("vae_decoder", "cuda,cpu"),)).for_component("vae_decoder")
    assert same.provider_options == (("device_id", "1"),)  # the same first provider keeps its options
    with pytest.raises(EdgesdError, match="unknown component 'clip'; use one of: text_encoder"):
        RuntimeOptions(component_providers=(("clip", "cpu"),))
    with pytest.raises(EdgesdError, match="--component-provider unet= names no provider"):
        RuntimeOptions(component_providers=(("unet", " "),))
    with pytest.raises(EdgesdError, match="--component-provider applies to the onnxruntime backend"):
        RuntimeOptions(component_providers=(("unet", "cpu"),)).for_backend("openvino")
    pipe = edgesd.Pipeline.load(component_providers=(("text_encoder", "cpu"),))
    assert pipe.placement()["text_encoder"] == {"cpu": sum(pipe.placement()["text_encoder"].values())}
    result = pipe("a red circle", num_inference_steps=1, seed=0)
    assert result.parameters["component_providers"] == {"text_encoder": "cpu"}


def test_component_provider_on_the_command_line(tmp_path):
    bad = run_edgesd("generate", "x", "--steps", "1", "--component-provider", "text_encoder", "-o",
                     str(tmp_path / "a.png"))
    assert bad.returncode != 0 and "--component-provider 'text_encoder' is not KEY=VALUE" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = run_edgesd("generate", "x", "--steps", "1", "--component-provider", "text_encoder=cpu", "-o",
                    str(tmp_path / "b.png"))
    assert ok.returncode == 0
    arena = run_edgesd("generate", "x", "--steps", "1", "--device-arena", "shared", "-o", str(tmp_path / "c.png"))
    assert arena.returncode != 0 and "--device-arena shared is for a provider with its own memory" in arena.stderr
