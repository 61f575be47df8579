"""DeepCache's graphs (Ma et al. 2023, Sec. 3.2), cut from an exported ONNX U-Net.

DeepCache runs the whole U-Net every N-th evaluation and keeps the input of its last up block (the deep
features); the evaluations between run only the shallow path (conv_in, the time embedding, the first down
block, the last up block fed the kept features, conv_out). Both graphs come from the exported U-Net by graph
surgery, so every ONNX recipe of ours (and optimum's export) works: the U-Net gains the deep features as a
second output and `unet_shallow/` takes them as an input. The cut ends with a parity check: the shallow graph
fed the full one's features must give the full one's output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx  # noqa: F401  (the `export` extra; edgesd deepcache says so when it is missing)

from edgesd.errors import EdgesdError
from edgesd.graphs import DEEP_FEATURES, UNET, UNET_SHALLOW
from edgesd.model import GRAPH_FILE, MANIFEST, ModelFolder

from .added import cpu_session, folder_to_add_to
from .parity import ParityResult, compare

# The shallow graph is the same nodes as the full one's path to its output: anything under this is a bad cut.
SHALLOW_MIN_PSNR_DB = 60.0
PARITY_LATENT_SIZE = 16
DATA_FILE = GRAPH_FILE + ".data"


def deep_feature_tensor(graph) -> str:
    """The input of the U-Net's last up block: the output of the one before it (its upsampler's convolution),
    found by the module names torch's exporter gives the nodes (diffusers' UNet2DConditionModel)."""
    convs = [n.output[0] for n in graph.node if n.op_type == "Conv" and "/up_blocks." in n.name
             and "/upsamplers.0/conv/" in n.name]
    if not convs:
        raise EdgesdError("the U-Net graph has no up-block upsampler convolution (not a diffusers U-Net export, or "
                          "its convolutions are quantized operators)", "cut DeepCache's graphs from an `edgesd "
                          "export` or `optimum-cli export onnx` U-Net of an fp32, fp16 or int8 (QDQ) recipe")
    return convs[-1]  # up_blocks.(n-2): the last up block has no upsampler


def _element_type(graph, tensor: str) -> int:
    """The ONNX element type of convolution output `tensor`: its weight's (an initializer, or what a
    DequantizeLinear or Cast makes of one)."""
    from onnx import TensorProto

    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    name = producer[tensor].input[1]
    for _ in range(8):
        if name in initializers:
            return initializers[name].data_type
        node = producer.get(name)
        if node is None:
            break
        if node.op_type == "Cast":
            return next(a.i for a in node.attribute if a.name == "to")
        if node.op_type == "DequantizeLinear":  # its output has the scale's type
            scale = node.input[1]
            if scale in initializers:
                return initializers[scale].data_type
            name = scale
            continue
        name = node.input[0]
    return TensorProto.FLOAT


def _path_to(graph, inputs: set[str], output: str) -> list:
    """The nodes that compute `output` from `inputs` (and initializers), in the graph's order."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    keep, stack = set(), [output]
    while stack:
        name = stack.pop()
        if not name or name in inputs or name not in producer or producer[name] in keep:
            continue
        keep.add(producer[name])
        stack.extend(graph.node[producer[name]].input)
    return [node for i, node in enumerate(graph.node) if i in keep]


def _cut(unet_path: Path, shallow_dir: Path) -> Path:
    """Write the full graph with the deep-features output beside `unet_path` (a temporary name, returned)
    and the shallow graph into `shallow_dir` (its weights in its own data file)."""
    import onnx
    from onnx import external_data_helper, helper

    model = onnx.load(str(unet_path), load_external_data=False)  # the weights stay where they are
    graph = model.graph
    if DEEP_FEATURES in {o.name for o in graph.output}:
        raise EdgesdError(f"{unet_path} already has DeepCache's output '{DEEP_FEATURES}' but no "
                          f"{UNET_SHALLOW} graph beside it", "export the model again, then add DeepCache")
    deep = deep_feature_tensor(graph)
    kind = _element_type(graph, deep)
    out_name = "out_sample"
    nodes = []
    for node in _path_to(graph, {i.name for i in graph.input} | {deep}, out_name):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            if name == deep:
                copy.input[i] = DEEP_FEATURES
        nodes.append(copy)
    used = {name for node in nodes for name in node.input}
    weights = []
    for tensor in graph.initializer:
        if tensor.name in used:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            if external_data_helper.uses_external_data(copy):
                external_data_helper.load_external_data_for_tensor(copy, str(unet_path.parent))
                copy.data_location = onnx.TensorProto.DEFAULT
                del copy.external_data[:]
            weights.append(copy)
    dims = next(t.dims for t in UNET.added_outputs if t.name == DEEP_FEATURES)  # symbolic, as the spec names them
    deep_info = helper.make_tensor_value_info(DEEP_FEATURES, kind, list(dims))
    shallow = helper.make_model(
        helper.make_graph(nodes, "unet_shallow", [*graph.input, deep_info],
                          [o for o in graph.output if o.name == out_name], weights),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    shallow_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(shallow, str(shallow_dir / GRAPH_FILE), save_as_external_data=True, location=DATA_FILE,
              size_threshold=1024)
    if (shallow_dir / DATA_FILE).exists():
        (shallow_dir / DATA_FILE).chmod(0o644)  # as the other graph files (onnx writes it owner-only)

    graph.node.append(helper.make_node("Identity", [deep], [DEEP_FEATURES], name="deepcache/deep_features"))
    graph.output.append(deep_info)
    full = unet_path.with_name(f".{unet_path.name}.deepcache-{os.getpid()}")
    onnx.save(model, str(full))
    return full


def _parity(full: Path, shallow: Path, feeds: dict[str, np.ndarray]) -> ParityResult:
    """The shallow graph on the full graph's deep features against the full graph's output (ONNX Runtime CPU)."""
    from edgesd.backends.base import fit_feeds
    from edgesd.graphs import ONNX_TO_NUMPY

    whole = cpu_session(full)
    inputs = whole.get_inputs()
    # one timestep for the batch: optimum's U-Net takes a scalar (the runtime's fit_feeds casts as for a run)
    feeds = {**feeds, "timestep": np.full_like(feeds["timestep"], feeds["timestep"][0])}
    cast = fit_feeds(full, feeds, {i.name: np.dtype(ONNX_TO_NUMPY[i.type]) for i in inputs},
                     {i.name: len(i.shape) for i in inputs})
    out_name = "out_sample"
    reference, features = whole.run([out_name, DEEP_FEATURES], cast)
    del whole
    got = cpu_session(shallow).run([out_name], {**cast, DEEP_FEATURES: features})[0]
    return compare(UNET_SHALLOW, out_name, reference.astype(np.float32), got.astype(np.float32),
                   SHALLOW_MIN_PSNR_DB)


def add_deepcache(root: str | Path) -> ParityResult:
    """Add DeepCache's graphs to the exported model at `root`: the U-Net's deep-features output and
    `unet_shallow/`. Nothing changes unless the cut passes its parity check."""
    folder = folder_to_add_to(root, "DeepCache's graphs", "edgesd deepcache")
    if folder.has(UNET_SHALLOW):
        raise EdgesdError(f"'{folder.root}' has DeepCache's graphs already", "generate with --deepcache-interval N")
    unet_path = folder.graph_path("unet")
    shallow_dir = folder.root / UNET_SHALLOW
    partial = folder.root / f".{UNET_SHALLOW}.partial-{os.getpid()}"
    full = None
    try:
        full = _cut(unet_path, partial)
        spec = folder.specs["unet"]
        sizes = folder.family.sample_sizes("unet", folder.configs, max(PARITY_LATENT_SIZE,
                                                                       folder.constants.latent_size_multiple))
        result = _parity(full, partial / GRAPH_FILE, spec.sample_inputs(sizes))
        if not result.passed:
            raise EdgesdError(f"DeepCache's shallow graph is {result.psnr_db:.1f} dB from the U-Net's output "
                              f"(needs >= {SHALLOW_MIN_PSNR_DB}); nothing was changed",
                              "report this model to the edgesd developers")
        os.replace(full, unet_path)  # the same weights file: only the graph gains an output
        partial.rename(shallow_dir)
        _update_manifest(folder)
        return result
    except OSError as e:
        raise EdgesdError(f"DeepCache's graphs could not be written ({e.strerror or e})",
                          "free disk space or check the folder's permissions; nothing was changed") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if full is not None and full.exists():
            full.unlink()


def _update_manifest(folder: ModelFolder) -> None:
    """edgesd.json (where the folder has one): the U-Net's outputs and the shallow graph's entry."""
    path = folder.root / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    specs = folder.specs
    unet = manifest["graphs"]["unet"]
    unet["outputs"] = [*unet["outputs"], *(t.to_json() for t in specs["unet"].added_outputs)]
    manifest["graphs"][UNET_SHALLOW] = {
        **specs[UNET_SHALLOW].to_json(), "file": f"{UNET_SHALLOW}/{GRAPH_FILE}",
        "format": "onnx", "precision": unet.get("precision", "fp32")}
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
