"""Which graph constant holds each LoRA-able weight (`<component>/weights.json`), so the runtime can add a LoRA
to a graph it loads without re-exporting.

Found by content: after tracing, every 2-D / 4-D weight of the PyTorch module (as it is, and transposed, as
constant folding may store a MatMul's weight) is matched by a hash of its bytes to the graph's initializers; a
recipe's graph (fp16 ONNX, OpenVINO IR) is matched again to the fp32 one. Weights stored twice (two layers
with the same values, deduplicated) or changed by the recipe (int8) get no entry, so a LoRA touching them is
refused rather than half-applied.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgesd.lora import LORA_COMPONENTS, WeightTarget, read_weight_map, write_weight_map
from edgesd.tensor_files import onnx_initializers

# The wrapper module (components.py) keeps the network as `.model`.
_WRAPPER_PREFIX = "model."


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def traced_weight_map(module, graph: Path) -> dict[str, WeightTarget]:
    """diffusers weight name -> initializer of the fp32 graph at `graph`, for `module`'s matrices and kernels."""
    wanted: dict[bytes, list[tuple[str, tuple, bool]]] = {}
    sizes = set()
    for name, param in module.named_parameters():
        if param.ndim not in (2, 4):
            continue
        value = param.detach().float().numpy()
        name = name.removeprefix(_WRAPPER_PREFIX)
        wanted.setdefault(_digest(value), []).append((name, tuple(value.shape), False))
        if value.ndim == 2:
            wanted.setdefault(_digest(value.T), []).append((name, tuple(value.shape), True))
        sizes.add(value.size)
    found: dict[str, WeightTarget] = {}
    shared: set[str] = set()
    for init in onnx_initializers(graph).values():
        if init.dtype != np.float32 or int(np.prod(init.dims)) not in sizes:
            continue
        for name, shape, transposed in wanted.get(_digest(init.read()), []):
            if name in found:
                shared.add(name)
            found[name] = WeightTarget(init.name, shape, transposed)
    for matches in wanted.values():  # equal weights: one constant may serve both, so neither is safe to change
        names = {name for name, _, _ in matches}
        if len(names) > 1:
            shared |= names
    return {name: t for name, t in found.items() if name not in shared}


def recipe_weight_map(component: str, fp32_dir: Path, out_dir: Path, recipe: str, fmt: str) -> None:
    """Write out_dir/weights.json for the recipe graph in out_dir (or remove it: int8 weights take no LoRA)."""
    fp32_map = read_weight_map(fp32_dir) if component in LORA_COMPONENTS else None
    target = out_dir / "weights.json"
    target.unlink(missing_ok=True)
    if fp32_map is None or recipe not in ("fp32", "fp16", "fp16-compute"):
        return
    if fmt == "onnx":
        names = set(onnx_initializers(out_dir / "model.onnx"))
        mapped = {}
        for name, t in fp32_map.items():
            stored = t.constant if t.constant in names else f"{t.constant}.fp16"  # recipes.store_weights_fp16
            if stored in names:
                mapped[name] = WeightTarget(stored, t.shape, t.transposed)
        write_weight_map(out_dir, mapped)
        return
    write_weight_map(out_dir, _ir_weight_map(fp32_map, fp32_dir / "model.onnx", out_dir / "openvino_model.xml"))


def _ir_weight_map(fp32_map: dict[str, WeightTarget], fp32_graph: Path, ir: Path) -> dict[str, WeightTarget]:
    """The IR constants holding the fp32 graph's mapped initializers (in f32 or compressed to f16)."""
    import openvino as ov

    inits = onnx_initializers(fp32_graph, {t.constant for t in fp32_map.values()})
    by_digest: dict[bytes, list[tuple[str, bool]]] = {}  # -> (weight name, stored transposed to the ONNX one)
    for name, t in fp32_map.items():
        value = inits[t.constant].read()
        flips = (False, True) if value.ndim == 2 else (False,)  # OpenVINO may undo a MatMul weight's transpose
        for flip in flips:
            oriented = value.T if flip else value
            for stored in (oriented, oriented.astype(np.float16)):
                by_digest.setdefault(_digest(stored), []).append((name, flip))
    mapped: dict[str, WeightTarget] = {}
    core = ov.Core()
    model = core.read_model(str(ir))  # kept while its constants are read: they point into its weights
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        data = op.get_data()
        if data.dtype not in (np.float32, np.float16) or data.ndim < 2:
            continue
        for name, flip in by_digest.get(_digest(data), []):
            t = fp32_map[name]
            mapped[name] = WeightTarget(op.get_friendly_name(), t.shape, t.transposed != flip)
    return mapped
