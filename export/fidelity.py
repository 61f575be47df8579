"""What a precision recipe costs: each graph and the whole pipeline against the fp32 export.

The fp32 pipeline runs over held-out prompts while its graphs' inputs are recorded; the recipe's graphs run
on the same inputs (per graph: output PSNR and cosine similarity), and the recipe's pipeline makes the same
pictures (image PSNR against the fp32 ones). Calibration for the static int8 recipe records the U-Net's
(and the VAE decoder's) inputs the same way, over other prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesd.images import from_pil
from edgesd.model import ModelFolder
from edgesd.pipeline import Pipeline

from .parity import psnr

# Prompts for calibration and for the fidelity check: disjoint sets, general enough for any SD model and
# in the embedded model's vocabulary (colours, shapes, backgrounds).
CALIBRATION_PROMPTS = (
    "a green square on a white background",
    "a photo of a dog running on a beach",
    "a small blue triangle at the top left on a black background",
    "a watercolor painting of a mountain lake at sunrise",
    "a yellow circle on a red background",
    "a portrait of an old man with a beard, studio lighting",
    "a large purple star in the middle on a grey background",
    "a city street at night with neon signs",
)
# A prompt that leaves the picture open (for the embedded model, one with no word it knows: "a photo of a cat
# sitting on a sofa") has no right picture: the fp32 one is one of several the model draws equally, and errors
# far below a recipe's threshold flip it to another (the embedded model's IR int8-weights U-Net, 55 dB from
# fp32, drew another scene for it: 9 dB; bench/results/recipes-fidelity-edgesd-tiny-openvino-2026-12-05.md).
# So every prompt here names the whole scene in the embedded model's words and still reads as a photo prompt.
FIDELITY_PROMPTS = (
    "a red circle on a blue background",
    "a photo of a small yellow triangle at the top left on a purple background",
    "a white square at the bottom right on a green background",
)
# Steps and largest image side of the calibration and fidelity runs (an SD 1.5 U-Net step at 256 x 256 takes
# a quarter of one at 512 x 512).
RUN_STEPS = 10
RUN_MAX_SIZE = 256
SEED = 1234
# At most this many recorded U-Net inputs are used for its per-graph comparison.
MAX_UNET_FEEDS = 6
# VAE decoder calibration: each run's final latents, centre-cropped to at most this side. onnxruntime's MinMax
# calibration keeps every intermediate tensor of every input in memory: 20 GB for four SD 1.5 decodes at
# 64x64 latents, about 0.3 GB per input at 16x16.
VAE_CALIBRATION_SIDE = 16


class _Recording:
    """A graph that keeps a copy of every (feeds, outputs) pair it runs."""

    def __init__(self, graph, runs: list):
        self.graph, self.runs = graph, runs

    def __getattr__(self, name):  # spec, path, placement, ...: the recorded graph's
        return getattr(self.graph, name)

    def run(self, feeds, local=None, release=False):
        outputs = self.graph.run(feeds, local, release)
        copy = lambda arrays: {k: np.array(v) for k, v in arrays.items()}  # noqa: E731
        self.runs.append((copy(feeds), copy(outputs)))
        return outputs


def _size(folder: ModelFolder) -> int:
    return min(folder.constants.default_image_size, RUN_MAX_SIZE)


def _inpainting_inputs(size: int) -> dict:
    """A fixed picture (a horizontal gradient) and mask (the middle half) for models that only inpaint."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    picture = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[::-1], (size, 1)), np.full((size, size), 128.0)], -1)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return {"image": picture.astype(np.uint8), "mask_image": mask}


def _generate(pipe: Pipeline, prompt: str):
    size = _size(pipe.folder)
    extra = _inpainting_inputs(size) if pipe.family.inpaint_unet else {}
    return pipe(prompt, num_inference_steps=RUN_STEPS, width=size, height=size, seed=SEED, **extra).images[0]


def record_runs(pipe: Pipeline, prompts) -> tuple[dict[str, list], list]:
    """Generate with `pipe` over `prompts`; returns each graph's (feeds, outputs) runs and the images."""
    runs = {name: [] for name in pipe.graphs}
    recording = Pipeline(pipe.folder, {n: _Recording(g, runs[n]) for n, g in pipe.graphs.items()}, pipe.tokenizers,
                         pipe.options)
    return runs, [_generate(recording, p) for p in prompts]


def calibration_feeds(model: Path, prompts: list[str]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per graph that static quantization calibrates: its inputs over the fp32 pipeline's runs (RUN_STEPS each)
    for `prompts`: every U-Net call, and the VAE decoder's latents (one per prompt, cropped)."""
    runs = record_runs(Pipeline.load(model), prompts)[0]
    return {"unet": [feeds for feeds, _ in runs["unet"]],
            "vae_decoder": [cropped_latents(feeds) for feeds, _ in runs.get("vae_decoder", [])]}


def cropped_latents(feeds: dict[str, np.ndarray], side: int = VAE_CALIBRATION_SIDE) -> dict[str, np.ndarray]:
    """Each (B, C, h, w) input cut to its centre side x side (what it is where already smaller)."""
    def crop(x: np.ndarray) -> np.ndarray:
        if x.ndim != 4:
            return x
        top, left = max(0, (x.shape[2] - side) // 2), max(0, (x.shape[3] - side) // 2)
        return np.ascontiguousarray(x[:, :, top:top + side, left:left + side])
    return {name: crop(x) for name, x in feeds.items()}


@dataclass(frozen=True)
class GraphFidelity:
    component: str
    recipe: str
    output: str
    psnr_db: float
    cosine: float
    size_mb: float
    fp32_size_mb: float

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "output": self.output, "psnr_db": _finite(self.psnr_db),
                "cosine": round(self.cosine, 6), "size_mb": round(self.size_mb, 2),
                "fp32_size_mb": round(self.fp32_size_mb, 2)}


@dataclass(frozen=True)
class FidelityReport:
    graphs: list[GraphFidelity]
    image_psnr_db: list[float]  # one per prompt
    threshold_db: float
    prompts: tuple[str, ...]

    @property
    def mean_image_psnr_db(self) -> float:
        return float(np.mean(self.image_psnr_db)) if self.image_psnr_db else float("inf")

    @property
    def worst_image_psnr_db(self) -> float:
        return float(min(self.image_psnr_db)) if self.image_psnr_db else float("inf")

    @property
    def passed(self) -> bool:
        """The worst prompt decides: a mean can hide one broken picture."""
        return self.worst_image_psnr_db >= self.threshold_db

    def to_json(self) -> dict:
        return {
            "graphs": {f"{g.component}.{g.output}": g.to_json() for g in self.graphs},
            "pipeline": {"image_psnr_db": [_finite(v) for v in self.image_psnr_db],
                         "mean_image_psnr_db": _finite(self.mean_image_psnr_db),
                         "worst_image_psnr_db": _finite(self.worst_image_psnr_db),
                         "threshold_db": self.threshold_db, "passed": self.passed,
                         "prompts": list(self.prompts), "steps": RUN_STEPS, "seed": SEED},
        }


def _finite(value: float) -> float | None:
    return None if np.isinf(value) else round(float(value), 2)


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator else float(np.array_equal(a, b))


def measure(reference: Path, candidate: Path, recipes: dict[str, str], threshold_db: float,
            prompts: tuple[str, ...] = FIDELITY_PROMPTS) -> FidelityReport:
    """Compare the export at `candidate` (component -> recipe in `recipes`) with the fp32 one at `reference`."""
    sizes = {c: (_folder_mb(candidate / c), _folder_mb(reference / c)) for c in recipes}
    specs = ModelFolder.open(reference).specs
    if candidate.resolve() == reference.resolve():  # the fp32 ONNX export itself: nothing to compare
        graphs = [GraphFidelity(c, r, out, float("inf"), 1.0, *sizes[c])
                  for c, r in recipes.items() for out in specs[c].output_names]
        return FidelityReport(graphs, [], threshold_db, tuple(prompts))
    fp32 = Pipeline.load(reference)
    runs, reference_images = record_runs(fp32, prompts)
    if "vae_encoder" in recipes:
        encoder, size = fp32.graph("vae_encoder"), _size(fp32.folder)
        runs["vae_encoder"] = [(f, encoder.run(f)) for f in
                               ({"sample": from_pil(im, size, size)} for im in reference_images)]
    step = max(1, len(runs["unet"]) // MAX_UNET_FEEDS)
    runs["unet"] = runs["unet"][::step][:MAX_UNET_FEEDS]
    del fp32  # one pipeline in memory at a time (an SDXL fp32 one holds 12 GB)
    pipe = Pipeline.load(candidate)
    graphs = []
    for component, recipe in recipes.items():
        if recipe == "fp32":
            graphs += [GraphFidelity(component, recipe, out, float("inf"), 1.0, *sizes[component])
                       for out in specs[component].output_names]
            continue
        graph = pipe.graph(component)
        got_runs = [graph.run(feeds) for feeds, _ in runs[component]]
        for out in specs[component].output_names:
            want = np.concatenate([outputs[out].ravel() for _, outputs in runs[component]])
            got = np.concatenate([outputs[out].ravel() for outputs in got_runs])
            value = psnr(want, got) if np.all(np.isfinite(got)) else float("-inf")
            graphs.append(GraphFidelity(component, recipe, out, value, cosine(want, got), *sizes[component]))
    image_psnr = [psnr(np.asarray(want, np.float64), np.asarray(_generate(pipe, prompt), np.float64))
                  for prompt, want in zip(prompts, reference_images)]
    return FidelityReport(graphs, image_psnr, threshold_db, tuple(prompts))
