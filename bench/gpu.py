"""edgesd on a GPU machine against diffusers on PyTorch CUDA, on the SD 1.5 architecture with RANDOM weights,
512x512, 20 Euler steps, guidance 7.5 (the U-Net at batch 2).

    python3 bench/gpu.py --work /tmp/work --configs DIR --out OUT --phases build,export,fp16-compute,diffusers-cuda,edgesd-cuda-fp16
    python3 bench/gpu.py --work /tmp/work --out OUT --phases edgesd-webgpu     # after the first (same machine)
    python3 bench/gpu.py --report OUT/results.json [MORE.json]                  # here: bench/results/gpu-*.md

Runs on a machine with one NVIDIA H200 and a 16-core Intel Xeon, without network: the phases build the
random-weight SD 1.5 folder from the reference configs, export it with edgesd (fp32 ONNX), then time each
configuration in a fresh process: after a warm-up picture, one 20-step and one 1-step picture, so
s/step = (t20 - t1) / 19 holds the U-Net and the sampler only. GPU memory is edgesd.benchmark.DeviceMemory's
peak (NVML polled every 2 ms, nvidia-smi every 50 ms before 2026-12-03's last run, which missed short peaks
such as the VAE decode's: the process's own use, or the card's less its reading before the run where the
driver does not list the process); diffusers also gives torch's max_memory_reserved. The
machine has no network: bench/gpu_session.sh installs what travels (onnxruntime-gpu for the CUDA EP,
onnxruntime-ep-webgpu, diffusers) and runs the phases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
STEPS, SIZE, GUIDANCE, SEED = 20, 512, 7.5, 0


def _clock(run) -> dict:
    """Warm-up, then a 20-step and a 1-step picture: total and s/step."""
    run(1)
    start = time.perf_counter()
    run(STEPS)
    t20 = time.perf_counter() - start
    start = time.perf_counter()
    run(1)
    t1 = time.perf_counter() - start
    return {"total_s": round(t20, 3), "one_step_s": round(t1, 3), "s_per_step": round((t20 - t1) / (STEPS - 1), 4)}


def phase_build(work: Path, configs: Path) -> dict:
    from edgesd.export.tiny import build_random_sd

    start = time.perf_counter()
    if not (work / "sd15-random" / "model_index.json").exists():
        build_random_sd(work / "sd15-random", seed=0, reference_config=configs)
    return {"build_s": round(time.perf_counter() - start, 1)}


def phase_export(work: Path, configs: Path) -> dict:
    from edgesd.export import ExportOptions, export_model

    start = time.perf_counter()
    if not (work / "sd15-onnx" / "edgesd.json").exists():
        export_model(work / "sd15-random", work / "sd15-onnx", ExportOptions(overwrite=True, with_vae_encoder=False))
    return {"export_s": round(time.perf_counter() - start, 1)}


def _recipe_folder(work: Path, folder: str, recipe: str, overrides: dict | None = None) -> float:
    """work/folder: `recipe` of each graph (with `overrides` per component), written from the fp32 export by
    the exporter's own function (what `edgesd export --recipe R` writes, without its CPU fidelity runs)."""
    import json as json_
    import shutil

    from edgesd.export.recipes import component_recipes, write_recipe

    start = time.perf_counter()
    src, dst = work / "sd15-onnx", work / folder
    if not (dst / "edgesd.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx*", "edgesd.json"))
        chosen = component_recipes(recipe, overrides, components=("text_encoder", "unet", "vae_decoder"))
        for component, name in chosen.items():
            write_recipe(src / component / "model.onnx", dst / component / "model.onnx", name)
        manifest = json_.loads((src / "edgesd.json").read_text())
        for component, name in chosen.items():
            manifest["graphs"][component]["precision"] = name
        (dst / "edgesd.json").write_text(json_.dumps(manifest, indent=2))
    return round(time.perf_counter() - start, 1)


def phase_fp16_compute(work: Path, configs: Path) -> dict:
    return {"fp16_compute_s": _recipe_folder(work, "sd15-fp16-compute", "fp16-compute")}


def phase_int8_fp16(work: Path, configs: Path) -> dict:
    """The modest-VRAM folder: int8 weights with fp16 arithmetic, the VAE in fp16 arithmetic too (as diffusers
    runs SD 1.5's; the recipe alone keeps it fp32, force_upcast)."""
    return {"int8_fp16_s": _recipe_folder(work, INT8_FP16["folder"], "int8-weights-fp16-compute",
                                          {"vae_decoder": "fp16-compute"})}


def phase_int8_fp16_te32(work: Path, configs: Path) -> dict:
    """The modest-VRAM folder with an fp32 text encoder, for running it on the CPU (--component-provider)."""
    return {"int8_fp16_te32_s": _recipe_folder(work, LEAN_VRAM["folder"], "int8-weights-fp16-compute",
                                               {"vae_decoder": "fp16-compute", "text_encoder": "fp32"})}


def phase_diffusers_cuda(work: Path, configs: Path) -> dict:
    import numpy as np

    from edgesd.benchmark import DeviceMemory
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(work / "sd15-random", torch_dtype=torch.float16, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    latents = torch.from_numpy(np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 8, SIZE // 8))
                               .astype(np.float16)).to("cuda")

    def run(steps: int):
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                 latents=latents, output_type="np")
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    with DeviceMemory() as memory:
        clock = _clock(run)
    return {"config": "diffusers torch CUDA fp16", "load_s": round(load_s, 2), **clock,
            "gpu_peak_gb": memory.peak_gb, "gpu_memory_of": memory.how, "gpu_memory_source": memory.source, "torch_max_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
            "torch": torch.__version__}


def _edgesd(work: Path, provider: str, folder: str = "sd15-onnx", label: str = "fp32", request: dict | None = None,
            **options) -> dict:
    import numpy as np
    import onnxruntime

    import edgesd
    from edgesd.benchmark import DeviceMemory

    with DeviceMemory() as memory:
        start = time.perf_counter()
        pipe = edgesd.Pipeline.load(work / folder, provider=provider, cache="off", **options)
        load_s = time.perf_counter() - start
        side = SIZE // pipe.constants.vae_scale_factor
        latents = np.random.default_rng(SEED).standard_normal((1, 4, side, side)).astype(np.float32)
        timings = {}

        def run(steps: int):
            result = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                          latents=latents, scheduler="euler", **(request or {}))
            timings[steps] = result.timings

        clock = _clock(run)
    placement = pipe.placement()
    t = timings[STEPS]
    return {"config": f"edgesd onnxruntime {provider} {label}", "load_s": round(load_s, 2), **clock,
            "unet_s_per_call": round(t["unet_s"] / t["unet_calls"], 4), "text_encoder_s": t["text_encoder_s"],
            "vae_decoder_s": t["vae_decoder_s"], "gpu_peak_gb": memory.peak_gb, "gpu_memory_of": memory.how, "gpu_memory_source": memory.source,
            "device_arena": options.get("device_arena", "auto"),
            "placement": {name: nodes for name, nodes in placement.items()}, "onnxruntime": onnxruntime.__version__}


def _process_gpu_gb() -> float:
    """This process's GPU memory now."""
    from edgesd.benchmark import DeviceMemory

    return DeviceMemory.process_gb()


def _memory_breakdown(work: Path, shared_arena: bool, vae: str = "sd15-fp16-compute",
                      folder: str = "sd15-fp16-compute") -> dict:
    """Where the CUDA EP's memory goes: this process's GPU memory after each graph loads and after each
    runs once (fp16-compute, lean options); with `shared_arena` the three sessions share one env allocator
    (session.use_env_allocators) instead of an arena each."""
    import numpy as np
    import onnxruntime as ort

    readings = {"start": _process_gpu_gb()}
    options = {"device_id": "0", **dict(LEAN)}
    if shared_arena:
        info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, {"device_id": "0"},
                                             ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    sessions = {}
    for name, graphs in (("text_encoder", folder), ("unet", folder), ("vae_decoder", vae)):
        made = ort.SessionOptions()
        if shared_arena:
            made.add_session_config_entry("session.use_env_allocators", "1")
        sessions[name] = ort.InferenceSession(str(work / graphs / name / "model.onnx"), made,
                                              providers=[("CUDAExecutionProvider", options)])
        readings[f"{name} loaded"] = _process_gpu_gb()
    rng = np.random.default_rng(0)
    hidden = sessions["text_encoder"].run(None, {"input_ids": np.full((2, 77), 49407, np.int64)})[0]
    readings["text_encoder run"] = _process_gpu_gb()
    feeds = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
             "timestep": np.array([500.0, 500.0], np.float32), "encoder_hidden_states": hidden.astype(np.float32)}
    for _ in range(2):
        sessions["unet"].run(None, feeds)
    readings["unet run"] = _process_gpu_gb()
    image = sessions["vae_decoder"].run(None, {"latent_sample": rng.standard_normal((1, 4, 64, 64), dtype=np.float32)})[0]
    readings["vae_decoder run"] = _process_gpu_gb()
    return {"config": f"memory breakdown{'' if folder == 'sd15-fp16-compute' else ', ' + folder}, "
                      f"{'one shared arena' if shared_arena else 'an arena per graph'}"
                      f"{', VAE fp16-compute' if vae != 'sd15-fp16-compute' else ''}",
            "gpu_gb": readings, "image_finite": bool(np.isfinite(image).all())}


def phase_vae_tile_shapes(work: Path, configs: Path) -> dict:
    """The VAE decoder (fp16-compute) on the CUDA EP, ms per 256-pixel tile of a 512x512 picture: the 9 tiles
    of diffusers' geometry (4 shapes: those at the edges cut short) against 9 of one shape (edgesd's)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(work / LEAN_VRAM["folder"] / "vae_decoder" / "model.onnx"),
                                   providers=[("CUDAExecutionProvider", {"device_id": "0", **dict(LEAN)})])
    rng = np.random.default_rng(0)
    cut = [(32, 32), (32, 32), (32, 16)] * 2 + [(16, 32), (16, 32), (16, 16)]  # rows at 0, 24, 48 of 64
    ways = {"4 shapes (diffusers' edge tiles)": cut, "1 shape (edge tiles moved inside)": [(32, 32)] * 9}
    results = {}
    for name, shapes in ways.items():
        feeds = [{"latent_sample": rng.standard_normal((1, 4, h, w), dtype=np.float32)} for h, w in shapes]
        for feed in feeds:  # each shape seen once
            session.run(None, feed)
        start = time.perf_counter()
        for _ in range(3):
            for feed in feeds:
                session.run(None, feed)
        results[name] = round((time.perf_counter() - start) / (3 * len(feeds)) * 1e3, 2)
    return {"config": "VAE decoder tiles of 256 px at 512x512, ms per tile (CUDA EP, fp16-compute)", "ms": results}


def phase_vae_fp16(work: Path, configs: Path) -> dict:
    """The decoder in fp16-compute too (diffusers runs SD 1.5's VAE in fp16; edgesd's recipe keeps it fp32)."""
    import shutil

    from edgesd.export.recipes import write_recipe

    dst = work / "sd15-vae-fp16-compute"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(work / "sd15-onnx" / "vae_decoder", dst / "vae_decoder", ignore=shutil.ignore_patterns("model.onnx*"))
    write_recipe(work / "sd15-onnx" / "vae_decoder" / "model.onnx", dst / "vae_decoder" / "model.onnx", "fp16-compute")
    return {"vae_fp16_s": 0}


def phase_dequantize_kernels(work: Path, configs: Path) -> dict:
    """Time on the CUDA EP the ways to turn an int8 weight of SD 1.5's largest convolution (1280x1280x3x3,
    one scale per output channel) into fp16: com.microsoft.DequantizeLinear (what the int8-weights-fp16-compute
    recipe writes), opset 21's DequantizeLinear, Cast + Mul; and an fp16 copy (Identity) for the bandwidth."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    q = np.random.default_rng(0).integers(-127, 128, (1280, 1280, 3, 3), dtype=np.int8)
    scale = np.full((1280,), 0.01, np.float16)
    ways = {"com.microsoft.DequantizeLinear": ([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0,
                                                                  domain="com.microsoft")], 17),
            "DequantizeLinear opset 21": ([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0)], 21),
            "Cast + Mul": ([helper.make_node("Cast", ["q"], ["c"], to=TensorProto.FLOAT16),
                            helper.make_node("Mul", ["c", "s4"], ["y"])], 17)}
    results = {}
    for name, (nodes, opset) in ways.items():
        inputs = [helper.make_tensor_value_info("q", TensorProto.INT8, list(q.shape))]
        inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(scale.reshape(-1, 1, 1, 1), "s4")]
        graph = helper.make_graph(nodes, "dq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        binding = session.io_binding()
        binding.bind_ortvalue_input("q", ort.OrtValue.ortvalue_from_numpy(q, "cuda", 0))
        binding.bind_output("y", "cuda")
        for _ in range(3):
            session.run_with_iobinding(binding)
        start = time.perf_counter()
        for _ in range(50):
            session.run_with_iobinding(binding)
        results[name] = round((time.perf_counter() - start) / 50 * 1e3, 3)
    return {"config": "int8 -> fp16 weight, 1280x1280x3x3, ms per call (CUDA EP)", "ms": results}


def phase_int8_fp16_cast_mul(work: Path, configs: Path) -> dict:
    """An experiment: the int8-fp16 folder with each com.microsoft.DequantizeLinear replaced by Cast + Mul."""
    import shutil

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src, dst = work / INT8_FP16["folder"], work / "sd15-int8-fp16-castmul"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "unet" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        q, scale = node.input[0], inits[node.input[1]]
        axis = next(a.i for a in node.attribute if a.name == "axis")
        shape = [1] * len(inits[q].dims)
        shape[axis] = -1
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).reshape(shape), scale.name))
        nodes += [helper.make_node("Cast", [q], [q + ".fp16"], to=TensorProto.FLOAT16),
                  helper.make_node("Mul", [q + ".fp16", scale.name], [node.output[0]])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for f in (dst / "unet").glob("model.onnx*"):
        f.unlink()
    onnx.save_model(model, str(dst / "unet" / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    return {"cast_mul_nodes": sum(n.op_type == "Mul" for n in nodes)}


FP16 = dict(folder="sd15-fp16-compute", label="fp16-compute")
INT8_FP16 = dict(folder="sd15-int8-fp16", label="int8-weights-fp16-compute, VAE fp16-compute")
GPU_MEM_LIMIT = 4 * 2**30  # "modest VRAM": each session's CUDA arena capped at 4 GB
# CUDA EP options that trade a little speed for memory: the arena grows by what is asked (not doubling),
# cuDNN picks convolution algorithms by heuristics with a small workspace instead of trying all of them.
LEAN = (("arena_extend_strategy", "kSameAsRequested"), ("cudnn_conv_algo_search", "HEURISTIC"),
        ("cudnn_conv_use_max_workspace", "0"))
# Modest VRAM: int8 U-Net weights in fp16 arithmetic with the text encoder on the CPU, then the ways to hold
# less working memory: arenas shrunk after each run (per-run) or after each graph's stage of a picture (per-stage),
# or one arena for the process, split guidance (half the U-Net's activations), the VAE decoded in 256-pixel tiles.
LEAN_VRAM = dict(folder="sd15-int8-fp16-te32", component_providers=(("text_encoder", "cpu"),))
_LEAN_STEPS = {
    "te-cpu": ("text encoder on the CPU", {"device_arena": "per-graph"}, None),
    "te-cpu-shared": ("text encoder on the CPU, one arena", {"device_arena": "shared"}, None),
    "te-cpu-shared-split": ("text encoder on the CPU, one arena, split guidance",
                            {"device_arena": "shared", "guidance_batch": "split"}, None),
    "te-cpu-shared-tile256": ("text encoder on the CPU, one arena, VAE tiles of 256",
                              {"device_arena": "shared"}, {"vae_tiling": "on", "vae_tile_size": 256}),
    "te-cpu-shared-split-tile256": ("text encoder on the CPU, one arena, split guidance, VAE tiles of 256",
                                    {"device_arena": "shared", "guidance_batch": "split"},
                                    {"vae_tiling": "on", "vae_tile_size": 256}),
    "te-cpu-tile256": ("text encoder on the CPU, VAE tiles of 256", {"device_arena": "per-graph"},
                       {"vae_tiling": "on", "vae_tile_size": 256}),
    "te-cpu-perrun": ("text encoder on the CPU, arenas shrunk after each run", {"device_arena": "per-run"}, None),
    "te-cpu-perrun-split": ("text encoder on the CPU, arenas shrunk after each run, split guidance",
                            {"device_arena": "per-run", "guidance_batch": "split"}, None),
    "te-cpu-perrun-tile256": ("text encoder on the CPU, arenas shrunk after each run, VAE tiles of 256",
                              {"device_arena": "per-run"}, {"vae_tiling": "on", "vae_tile_size": 256}),
    "te-cpu-perrun-split-tile256": ("text encoder on the CPU, arenas shrunk after each run, split guidance, "
                                    "VAE tiles of 256", {"device_arena": "per-run", "guidance_batch": "split"},
                                    {"vae_tiling": "on", "vae_tile_size": 256}),
    "te-cpu-perstage": ("text encoder on the CPU, arenas shrunk after each stage", {"device_arena": "per-stage"},
                        None),
    "te-cpu-perstage-tile256": ("text encoder on the CPU, arenas shrunk after each stage, VAE tiles of 256",
                                {"device_arena": "per-stage"}, {"vae_tiling": "on", "vae_tile_size": 256}),
}
DEEPCACHE_FOLDER = LEAN_VRAM["folder"] + "-deepcache"


def phase_deepcache(work: Path, configs: Path) -> dict:
    """A copy of the modest-VRAM folder with DeepCache's graphs (what `edgesd deepcache` adds)."""
    import shutil

    from edgesd.export.deepcache import add_deepcache

    start = time.perf_counter()
    dst = work / DEEPCACHE_FOLDER
    if not (dst / "unet_shallow").is_dir():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(work / LEAN_VRAM["folder"], dst)
        add_deepcache(dst)
    return {"deepcache_s": round(time.perf_counter() - start, 1)}


def _deepcache(interval: int):
    """The 2.31 GB configuration (text encoder on the CPU, per-stage arenas, VAE tiles of 256) with DeepCache."""
    request = {"vae_tiling": "on", "vae_tile_size": 256, "deepcache_interval": interval}
    label = f"int8-weights-fp16-compute, text encoder on the CPU, VAE tiles of 256, DeepCache interval {interval}"
    return lambda work, configs: _edgesd(work, "cuda", folder=DEEPCACHE_FOLDER, label=label, request=request,
                                         component_providers=LEAN_VRAM["component_providers"],
                                         device_arena="per-stage")


def _lean_vram(label: str, options: dict, request: dict | None):
    return lambda work, configs: _edgesd(work, "cuda", label="int8-weights-fp16-compute, " + label,
                                         request=request, **LEAN_VRAM, **options)


PHASES = {
    "build": phase_build,
    "export": phase_export,
    "fp16-compute": phase_fp16_compute,
    "int8-fp16": phase_int8_fp16,
    "dequantize-kernels": phase_dequantize_kernels,
    "int8-fp16-castmul": phase_int8_fp16_cast_mul,
    "diffusers-cuda": phase_diffusers_cuda,
    "edgesd-cpu": lambda work, configs: _edgesd(work, "cpu"),
    "edgesd-webgpu": lambda work, configs: _edgesd(work, "webgpu"),
    "edgesd-webgpu-fp16": lambda work, configs: _edgesd(work, "webgpu", **FP16),
    "edgesd-cuda": lambda work, configs: _edgesd(work, "cuda"),
    "edgesd-cuda-fp16": lambda work, configs: _edgesd(work, "cuda", **FP16),
    "edgesd-cuda-fp16-unbound": lambda work, configs: _edgesd(work, "cuda", folder=FP16["folder"],
                                                              label="fp16-compute io-binding off", io_binding="off"),
    "edgesd-cuda-fp16-4gb": lambda work, configs: _edgesd(
        work, "cuda", folder=FP16["folder"], label="fp16-compute gpu_mem_limit 4 GB",
        provider_options=(("gpu_mem_limit", str(GPU_MEM_LIMIT)), ("arena_extend_strategy", "kSameAsRequested"))),
    "edgesd-cuda-fp16-lean": lambda work, configs: _edgesd(
        work, "cuda", folder=FP16["folder"], label="fp16-compute lean (arena as requested, cuDNN heuristics)",
        provider_options=LEAN),
    "vae-fp16": phase_vae_fp16,
    "vae-tile-shapes": phase_vae_tile_shapes,
    "memory-own": lambda work, configs: _memory_breakdown(work, shared_arena=False),
    "memory-shared": lambda work, configs: _memory_breakdown(work, shared_arena=True),
    "memory-shared-vae16": lambda work, configs: _memory_breakdown(work, True, vae="sd15-vae-fp16-compute"),
    "edgesd-cuda-fp16-low": lambda work, configs: _edgesd(work, "cuda", folder=FP16["folder"],
                                                          label="fp16-compute --memory low", memory="low"),
    "edgesd-cuda-int8fp16": lambda work, configs: _edgesd(work, "cuda", **INT8_FP16),
    "edgesd-cuda-int8fp16-low": lambda work, configs: _edgesd(
        work, "cuda", folder=INT8_FP16["folder"], label=INT8_FP16["label"] + " --memory low", memory="low"),
    "edgesd-cuda-int8fp16-castmul": lambda work, configs: _edgesd(
        work, "cuda", folder="sd15-int8-fp16-castmul", label="int8 weights by Cast + Mul (experiment), VAE fp16-compute"),
    "memory-int8fp16-own": lambda work, configs: _memory_breakdown(work, False, vae=INT8_FP16["folder"],
                                                                   folder=INT8_FP16["folder"]),
    "memory-int8fp16": lambda work, configs: _memory_breakdown(work, True, vae=INT8_FP16["folder"],
                                                               folder=INT8_FP16["folder"]),
    "int8-fp16-te32": phase_int8_fp16_te32,
    "deepcache": phase_deepcache,
    "edgesd-cuda-int8fp16-deepcache2": _deepcache(2),
    "edgesd-cuda-int8fp16-deepcache3": _deepcache(3),
    **{f"edgesd-cuda-int8fp16-{key}": _lean_vram(*step) for key, step in _LEAN_STEPS.items()},
    "edgesd-cuda-fp16-lean-4gb": lambda work, configs: _edgesd(
        work, "cuda", folder=FP16["folder"], label="fp16-compute lean, gpu_mem_limit 4 GB",
        provider_options=(*LEAN, ("gpu_mem_limit", str(GPU_MEM_LIMIT)))),
}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version()}


def run_phases(phases: list[str], work: Path, configs: Path, out: Path) -> None:
    """Each phase in a fresh process; its JSON (or its error's last line) into out/results.json, rewritten
    after each phase (a call cut short still returns what was done). A phase named again is another round,
    kept as PHASE#2, PHASE#3, ... (alternate configurations for rounds side by side)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine()}
    for phase in phases:
        rounds = sum(1 for key in results if key.split("#")[0] == phase)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--phase", phase, "--work", str(work),
                               "--configs", str(configs)], capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if done.returncode == 0 and lines else \
            {"error": "\n".join(done.stderr.strip().splitlines()[-6:])[-1500:]}
        row["phase_wall_s"] = round(time.perf_counter() - start, 1)
        key = phase if not rounds else f"{phase}#{rounds + 1}"
        row["round"] = rounds + 1
        results[key] = row
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(key, json.dumps(row)[:600], flush=True)


def _gpu_gb(row: dict) -> str:
    if row.get("gpu_peak_gb") is not None:
        return f"{row['gpu_peak_gb']:.2f}" + (" (card)" if row.get("gpu_memory_of") == "card" else "")
    return f"{row['gpu_peak_mb'] / 1000:.2f} (card)" if "gpu_peak_mb" in row else "-"  # rows of 2026-12-02's first run


def _side_by_side(rows: dict) -> list[str]:
    """Each configuration of the rounds against diffusers' row of the same round (phases alternated)."""
    base = {name: r for name, r in rows.items() if name.split("#")[0] == "diffusers-cuda" and "s_per_step" in r}
    by_round = {r.get("round", 1): r for r in base.values()}
    if len(by_round) < 2:
        return []
    lines = ["", "Rounds side by side (each row against diffusers' in the same round):", "",
             "| configuration | round | s/step | diffusers s/step | 20 steps s | diffusers 20 steps s | GPU memory GB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        d = by_round.get(r.get("round", 1))
        if name in base or d is None or "s_per_step" not in r:
            continue
        lines.append(f"| {r['config']} | {r.get('round', 1)} | {r['s_per_step']} | {d['s_per_step']} | "
                     f"{r['total_s']} | {d['total_s']} | {_gpu_gb(r)} |")
    return lines


def report(paths: list[Path], date: str) -> str:
    rows = {}
    for path in paths:  # results.json files: phase -> row
        rows.update({k: v for k, v in json.loads(path.read_text()).items() if isinstance(v, dict)})
    m = rows.pop("machine", {})
    lines = [f"# edgesd on a GPU, {date}", "",
             "SD 1.5 architecture, RANDOM weights, 512x512, 20 Euler steps, guidance 7.5 (U-Net batch 2); "
             "`bench/gpu.py` on " + f"{m.get('gpu', '?')}; {m.get('cpu', '?')}, {m.get('cores')} cores.",
             "", "| configuration | load s | 20 steps s | s/step | VAE s | GPU memory GB | nodes per provider |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "config" not in r or "s_per_step" not in r:
            continue
        nodes = "; ".join(f"{g}: " + ", ".join(f"{p} {k}" for p, k in n.items())
                          for g, n in r.get("placement", {}).items()) or "-"
        label = r["config"] + (f", round {r['round']}" if "#" in name or f"{name}#2" in rows else "")
        lines.append(f"| {label} | {r['load_s']} | {r['total_s']} | {r['s_per_step']} | "
                     f"{r.get('vae_decoder_s', '-')} | {_gpu_gb(r)} | {nodes} |")
    lines += _side_by_side(rows)
    sources = {r.get("gpu_memory_source", "nvidia-smi") for r in rows.values() if r.get("gpu_peak_gb") is not None}
    if sources:
        lines.append(f"\nGPU memory read by {', '.join(sorted(sources))} "
                     "(nvidia-smi: every 50 ms, which can miss a peak shorter than that; NVML: every 2 ms).")
    breakdowns = [r for r in rows.values() if "gpu_gb" in r]
    if breakdowns:
        stages = list(breakdowns[0]["gpu_gb"])
        lines += ["", "Where the CUDA EP's memory goes (GB on the GPU for this process, after each stage):", "",
                  "| configuration | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
        lines += [f"| {r['config']} | " + " | ".join(str(r["gpu_gb"].get(s, "-")) for s in stages) + " |"
                  for r in breakdowns]
    for r in rows.values():
        if "ms" in r:
            lines.append(f"\n{r['config']}: " + "; ".join(f"{way} {ms}" for way, ms in r["ms"].items()))
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"\n{name} failed: `{r['error'].splitlines()[-1][:300]}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=list(PHASES))
    parser.add_argument("--phases", default=None, help="comma-separated phases to run, each in its own process")
    parser.add_argument("--work", type=Path, default=Path("/tmp/work"))
    parser.add_argument("--configs", type=Path, default=Path(".cfg/sd15"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", nargs="*", type=Path, default=None)
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase:
        print(json.dumps(PHASES[args.phase](args.work, args.configs)))
    elif args.report is not None:
        print(report(args.report, args.date), end="")
    else:
        run_phases(args.phases.split(","), args.work, args.configs, args.out)


if __name__ == "__main__":
    main()
