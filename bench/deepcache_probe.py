"""Does feature reuse across steps (DeepCache, Ma et al. 2023) pay? A probe on edgesd's own ONNX U-Nets, before
building it into the exporter and runtime.

    .venv/bin/python bench/deepcache_probe.py [--sd15 bench/work/sd15-random-onnx/unet/model.onnx] [--intervals 2,3,5]

DeepCache runs the whole U-Net every N-th step and keeps the input of its last up block (the deep features);
the steps between run only the shallow path: conv_in, the time embedding, the first down block, the last up
block (fed the kept features) and conv_out. Both graphs are cut from the exported U-Net by graph surgery
(the full one gains the deep features as an output; the shallow one takes them as an input), so any export
works, the embedded model's too.

- speed: the shallow graph's time against the full one's on the SD 1.5 architecture with RANDOM weights
  (ONNX Runtime CPU, batch 2, 64x64 latents), hence the mean step at each interval N;
- quality: the embedded model's pictures at each N against its ordinary ones (20 Euler steps, its guidance,
  the fidelity prompts), PSNR in dB.
Results: bench/results/deepcache-probe-vm-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from eval_adherence import psnr_against  # bench/ is on sys.path when a script of it runs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SD15_UNET = HERE / "work" / "sd15-random-onnx" / "unet" / "model.onnx"
OUTPUT = "out_sample"


def deep_feature_name(model: onnx.ModelProto) -> str:
    """The input of the last up block: the output of the one before it (its upsampler's convolution)."""
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv" and "/up_blocks." in n.name
             and "/upsamplers.0/conv/" in n.name]
    if not convs:
        raise SystemExit("no up-block upsampler found: not a diffusers U-Net export")
    return convs[-1]  # up_blocks.(n-2): the last up block has no upsampler


def _subgraph_nodes(model: onnx.ModelProto, inputs: set[str], outputs: list[str]) -> list:
    """The nodes that compute `outputs` from `inputs` (and the initializers), in the graph's order."""
    producer = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    keep, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if not name or name in inputs or name not in producer or producer[name] in keep:
            continue
        keep.add(producer[name])
        stack.extend(model.graph.node[producer[name]].input)
    return [node for i, node in enumerate(model.graph.node) if i in keep]


def cut(unet: Path, out_dir: Path) -> tuple[Path, Path, str]:
    """(full graph with the deep features as a second output, shallow graph taking them) beside each other in
    out_dir; weights kept in an external file stay there (the new graphs point at it: out_dir = unet's folder)."""
    model = onnx.load(str(unet), load_external_data=out_dir != unet.parent)
    deep = deep_feature_name(model)
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.append(helper.make_tensor_value_info(deep, TensorProto.FLOAT, None))
    full_path = out_dir / "deepcache-full.onnx"
    onnx.save(full, str(full_path))

    graph_inputs = {i.name for i in model.graph.input}
    nodes = _subgraph_nodes(model, graph_inputs | {deep}, [OUTPUT])
    used = {name for node in nodes for name in node.input}
    shallow_graph = helper.make_graph(
        nodes, "unet-shallow",
        [i for i in model.graph.input if i.name in used] + [helper.make_tensor_value_info(deep, TensorProto.FLOAT, None)],
        list(model.graph.output), [t for t in model.graph.initializer if t.name in used])
    shallow = helper.make_model(shallow_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    shallow_path = out_dir / "deepcache-shallow.onnx"
    onnx.save(shallow, str(shallow_path))
    return full_path, shallow_path, deep


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    made = ort.SessionOptions()
    made.enable_cpu_mem_arena = False
    if threads:
        made.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), made, providers=["CPUExecutionProvider"])


def speed(unet: Path, runs: int = 3) -> dict:
    """Median seconds of the full and the shallow U-Net at batch 2, 64x64, SD 1.5's 77 x 768 text states."""
    full_path, shallow_path, deep = cut(unet, unet.parent)
    try:
        rng = np.random.default_rng(0)
        feeds = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
                 "timestep": np.array([500, 500], np.int64),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
        full = _session(full_path)
        types = {i.name: i.type for i in full.get_inputs()}
        if types["timestep"] == "tensor(float)":
            feeds["timestep"] = feeds["timestep"].astype(np.float32)
        times = {"full": [], "shallow": []}
        features = full.run([OUTPUT, deep], feeds)[1]
        for _ in range(runs):
            start = time.perf_counter()
            full.run([OUTPUT, deep], feeds)
            times["full"].append(time.perf_counter() - start)
        del full
        shallow = _session(shallow_path)
        shallow_feeds = {**feeds, deep: features}
        shallow.run(None, shallow_feeds)
        for _ in range(runs):
            start = time.perf_counter()
            shallow.run(None, shallow_feeds)
            times["shallow"].append(time.perf_counter() - start)
    finally:
        for f in (full_path, shallow_path):
            f.unlink(missing_ok=True)
    return {k: round(float(np.median(v)), 3) for k, v in times.items()}


class _CachedUNet:
    """Stands in for the pipeline's U-Net graph: the full graph on every `interval`-th call (keeping the deep
    features), the shallow one between. The probe runs guidance joint, so one call is one step."""

    def __init__(self, graph, full: Path, shallow: Path, deep: str, interval: int):
        self.graph, self.deep, self.interval = graph, deep, interval
        self.full, self.shallow = _session(full), _session(shallow)
        self.types = {i.name: np.int64 if i.type == "tensor(int64)" else np.float32 for i in self.full.get_inputs()}
        self.calls, self.features = 0, None

    def __getattr__(self, name):  # the rest (spec, input_dtype, ...) is the real graph's
        return getattr(self.graph, name)

    def run(self, feeds: dict, local: dict | None = None, release: bool = False) -> dict:
        cast = {k: v.astype(self.types[k]) for k, v in feeds.items()}
        if self.calls % self.interval == 0:
            out, self.features = self.full.run([OUTPUT, self.deep], cast)
        else:
            out = self.shallow.run([OUTPUT], {**cast, self.deep: self.features})[0]
        self.calls += 1
        return {OUTPUT: out}


def quality(intervals: list[int], steps: int = 20) -> dict:
    """PSNR (dB) of the embedded model's pictures with DeepCache at each interval against its ordinary ones."""
    import edgesd
    from edgesd.export.fidelity import FIDELITY_PROMPTS
    from edgesd.export.parity import psnr

    pipe = edgesd.Pipeline.load(guidance_batch="joint", cache="off")
    unet = pipe.folder.graph_path("unet")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        full, shallow, deep = cut(unet, Path(work))
        prompts = list(FIDELITY_PROMPTS)
        reference = [np.asarray(pipe(p, num_inference_steps=steps, seed=i, scheduler="euler").images[0], np.float64)
                     for i, p in enumerate(prompts)]
        real = pipe.graph("unet")
        for n in intervals:
            scores = []
            for i, p in enumerate(prompts):
                pipe.graphs["unet"] = _CachedUNet(real, full, shallow, deep, n)
                got = np.asarray(pipe(p, num_inference_steps=steps, seed=i, scheduler="euler").images[0], np.float64)
                scores.append(round(float(psnr(reference[i], got)), 2))
            results[str(n)] = scores
        adherence = {"1": _adherence(pipe, lambda: real, steps)}
        for n in intervals:
            adherence[str(n)] = _adherence(pipe, lambda: _CachedUNet(real, full, shallow, deep, n), steps)
            adherence[str(n)]["psnr_vs_1"] = psnr_against(adherence["1"]["images"], adherence[str(n)].pop("images"))
        adherence["1"].pop("images")
        pipe.graphs["unet"] = real
    return {"prompts": prompts, "psnr_db": results, "adherence": adherence}


def _adherence(pipe, unet, steps: int, batch: int = 10) -> dict:
    """The embedded model's adherence scores (models/adherence.py) on its 100 held-out prompts, with the U-Net
    `unet()` gives (a fresh one per batch: DeepCache's step count starts again)."""
    from edgesd.models.adherence import held_out_prompts, score

    items = held_out_prompts()
    prompts, scenes = [p for p, _ in items], [s for _, s in items]
    images = []
    for i in range(0, len(prompts), batch):
        pipe.graphs["unet"] = unet()
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, seed=i, scheduler="euler").images
    return {"scores": {k: round(v, 1) for k, v in score(images, scenes).items()}, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", type=Path, default=SD15_UNET, help="an SD 1.5-architecture U-Net export (fp32)")
    parser.add_argument("--intervals", default="2,3,5")
    args = parser.parse_args()
    from families_scale import machine  # bench/ is on sys.path when a script of it runs

    intervals = [int(n) for n in args.intervals.split(",")]
    timing = speed(args.sd15)
    fidelity = quality(intervals)
    ratio = timing["shallow"] / timing["full"]
    rows = [(n, (1 + (n - 1) * ratio) / n) for n in intervals]
    result = {"machine": machine(), "sd15_unet": str(args.sd15), "seconds": timing, "shallow_share": round(ratio, 3),
              "mean_step_share": {str(n): round(share, 3) for n, share in rows}, "embedded_model": fidelity}
    lines = [f"DeepCache probe (`bench/deepcache_probe.py`, {date.today()}; {machine()}).", "",
             f"SD 1.5 architecture, RANDOM weights, fp32 U-Net on ONNX Runtime's CPU EP at batch 2, 64x64: full "
             f"{timing['full']} s, shallow path {timing['shallow']} s ({ratio:.0%}).", "",
             "| interval N | mean step (share of full) | speed-up of the U-Net | embedded model PSNR vs ordinary, dB |",
             "|---:|---:|---:|---|"]
    for n, share in rows:
        lines.append(f"| {n} | {share:.2f} | {1 / share:.2f}x | {', '.join(map(str, fidelity['psnr_db'][str(n)]))} |")
    lines += ["", "Prompts: " + "; ".join(fidelity["prompts"]) + " (20 Euler steps, the model's guidance, joint batch).",
              "", "Adherence on the embedded model's 100 held-out prompts (models/adherence.py, %; PSNR of each "
              "picture against interval 1):", "", "| interval N | " + " | ".join(fidelity["adherence"]["1"]["scores"])
              + " | PSNR mean / worst dB |", "|---:|" + "---:|" * (len(fidelity["adherence"]["1"]["scores"]) + 1)]
    for n, row in fidelity["adherence"].items():
        against = row.get("psnr_vs_1")
        lines.append(f"| {n} | " + " | ".join(str(v) for v in row["scores"].values()) + " | "
                     + (f"{against['psnr_mean_db']} / {against['psnr_worst_db']}" if against else "-") + " |")
    stem = HERE / "results" / f"deepcache-probe-vm-{date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
