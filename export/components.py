"""One export function per component; each writes `<out>/<component>/model.onnx` and ends with parity.

Graphs are traced with torch.onnx's TorchScript exporter (the dynamo exporter took
25x longer on a tiny U-Net); names and dynamic axes come from edgesd.graphs.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgesd.backends import RuntimeOptions
from edgesd.backends.onnxruntime_backend import OrtGraph
from edgesd.graphs import GraphSpec
from edgesd.lora import LORA_COMPONENTS, write_weight_map

from .parity import ParityResult, compare
from .recipes import Attention, lossless_passes
from .weight_map import traced_weight_map

OPSET = 17
EXTERNAL_DATA_FILE = "model.onnx_data"
# Protobuf cannot hold a graph over 2 GB; above this the weights go to one external file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


class _TextEncoder(torch.nn.Module):
    """Returns the outputs its graph description names: hidden_states.N, last_hidden_state, pooler_output or
    text_embeds."""

    def __init__(self, model, spec: GraphSpec):
        super().__init__()
        self.model, self.names = model, spec.output_names

    def forward(self, input_ids):
        hidden = any(n.startswith("hidden_states.") for n in self.names)
        out = self.model(input_ids=input_ids, output_hidden_states=hidden, return_dict=True)
        return tuple(out.hidden_states[int(n.split(".")[1])] if n.startswith("hidden_states.") else getattr(out, n)
                     for n in self.names)


class _Unet(torch.nn.Module):
    """sample, timestep, encoder_hidden_states, then the family's extra inputs in graph order."""

    def __init__(self, model, spec: GraphSpec):
        super().__init__()
        self.model, self.extra = model, spec.input_names[3:]

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        given = dict(zip(self.extra, extra))
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given}  # SDXL
        return self.model(sample, timestep, encoder_hidden_states, timestep_cond=given.get("timestep_cond"),
                          added_cond_kwargs=added or None, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae, spec: GraphSpec):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    """Returns the latent distribution's mean and log-variance, (B, 2C, h, w)."""

    def __init__(self, vae, spec: GraphSpec):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


def save_graph(proto, path: Path) -> None:
    """Save an ONNX model; weights over EXTERNAL_DATA_THRESHOLD go to one file beside it."""
    import onnx

    data = path.parent / EXTERNAL_DATA_FILE
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    big = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)


def _write_graph(module: torch.nn.Module, args: tuple, spec: GraphSpec, out_dir: Path,
                 attention: Attention = "fused") -> Path:
    """Trace `module` to out_dir/model.onnx in fp32 (the recipes start from it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    big = n_bytes > EXTERNAL_DATA_THRESHOLD
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # A large module is traced without its weights (they become graph inputs), which are then streamed
        # from the module into one data file: no second in-memory copy of a 10 GB SDXL U-Net.
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET, export_params=not big,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=not big,
        )
    if big:
        _attach_weights(path, module, spec)
    lossless_passes(path, attention)
    return path


# Ops on weights that the exporter's constant folding would have applied; folded here while weights stream out.
_FOLDABLE = ("Transpose", "Identity", "Unsqueeze", "Squeeze")


def _fold(node, values: dict) -> Callable[[], np.ndarray]:
    """The value of a foldable `node` whose inputs are all known, as a function (evaluated when written)."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    source = values[node.input[0]]
    if node.op_type == "Identity":
        return source
    if node.op_type == "Transpose":
        return lambda: np.ascontiguousarray(np.transpose(source(), attrs.get("perm")))
    axes = [int(a) for a in (values[node.input[1]]() if len(node.input) > 1 else attrs["axes"])]
    if node.op_type == "Unsqueeze":
        def unsqueeze():
            out = source()
            for axis in sorted(a % (out.ndim + len(axes)) for a in axes):
                out = np.expand_dims(out, axis)
            return out
        return unsqueeze
    return lambda: np.squeeze(source(), axis=tuple(axes))


def _attach_weights(path: Path, module: torch.nn.Module, spec: GraphSpec) -> None:
    """Turn the graph inputs that are `module`'s parameters and buffers into initializers whose data is written,
    one tensor at a time, to EXTERNAL_DATA_FILE beside `path`; weight-only Transpose / Identity / (Un)squeeze
    nodes are folded into the weights they make, as constant folding does for a small graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    keep = [i for i in graph.input if i.name in spec.input_names]
    weights = [i.name for i in graph.input if i.name not in spec.input_names]
    missing = [name for name in weights if name not in tensors]
    if missing:
        raise RuntimeError(f"traced graph inputs that are neither graph inputs nor weights: {missing[:3]}")
    values = {name: (lambda t=tensors[name]: t.detach().contiguous().numpy()) for name in weights}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = (lambda n=node: onnx.numpy_helper.to_array(n.attribute[0].t))
    folded = []
    for node in graph.node:  # topological order: a fold's inputs are known before it
        if node.op_type in _FOLDABLE and all(i in values for i in node.input) and node.input[0] not in spec.input_names:
            values[node.output[0]] = _fold(node, values)
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    constants = {n.output[0] for n in graph.node if n.op_type == "Constant"}
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    data = path.parent / EXTERNAL_DATA_FILE
    offset = 0
    with open(data, "wb") as f:
        for name, value in values.items():
            if name not in used or name in constants:
                continue
            init = onnx.numpy_helper.from_array(value(), name)
            graph.initializer.append(init)
            raw = init.raw_data
            if len(raw) < 1024:  # small ones (shapes, axes) stay in the graph, where shape inference reads them
                continue
            init = graph.initializer[-1]
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, entry in (("location", EXTERNAL_DATA_FILE), ("offset", offset), ("length", len(raw))):
                item = init.external_data.add()
                item.key, item.value = key, str(entry)
            f.write(raw)
            offset += len(raw)
            pad = -offset % 4096  # aligned, as onnx's own writer does for memory mapping
            f.write(b"\0" * pad)
            offset += pad
    del graph.input[:]
    graph.input.extend(keep)
    onnx.save_model(model, str(path))


def _parity(path: Path, spec: GraphSpec, reference: dict[str, np.ndarray], feeds: dict[str, np.ndarray],
            threshold_db: float) -> list[ParityResult]:
    graph = OrtGraph(path, spec, RuntimeOptions(backend="onnxruntime"))
    got = graph.run(feeds)
    return [compare(spec.component, name, ref, got[name], threshold_db) for name, ref in reference.items()]


def _torch_outputs(module, args, spec: GraphSpec) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(*args)
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.numpy() for name, t in zip(spec.output_names, out)}


# What wraps each kind of component for tracing (the text encoders share one).
WRAPPERS = {"text_encoder": _TextEncoder, "text_encoder_2": _TextEncoder, "unet": _Unet,
            "vae_decoder": _VaeDecoder, "vae_encoder": _VaeEncoder}


def export_graph(load: Callable[[], torch.nn.Module], spec: GraphSpec, sizes: dict[str, int], out_dir: Path,
                 threshold_db: float, attention: Attention = "fused") -> list[ParityResult]:
    """Trace one component (`load()` makes its PyTorch module) to out_dir/model.onnx on its description's
    sample inputs, then check the graph against PyTorch on the same inputs (PSNR >= threshold_db per output).
    The module is freed before ONNX Runtime loads the graph, so the two never share the memory."""
    feeds = spec.sample_inputs(sizes)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    module = WRAPPERS[spec.component](load(), spec).eval()
    reference = _torch_outputs(module, args, spec)
    path = _write_graph(module, args, spec, out_dir, attention)
    if spec.component in LORA_COMPONENTS:  # where each weight went, for LoRA at load time
        write_weight_map(out_dir, traced_weight_map(module, path))
    del module
    gc.collect()
    return _parity(path, spec, reference, feeds, threshold_db)
