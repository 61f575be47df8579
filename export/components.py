"""One export function per component; each writes `<out>/<component>/model.onnx` and ends with parity.

Graphs are traced with torch.onnx's TorchScript exporter (the dynamo exporter took
25x longer on a tiny U-Net); names and dynamic axes come from edgesd.graphs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from edgesd.backends import RuntimeOptions
from edgesd.backends.onnxruntime_backend import OrtGraph
from edgesd.graphs import GraphSpec

from .parity import ParityResult, compare
from .recipes import dedupe_in_place

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


def _write_graph(module: torch.nn.Module, args: tuple, spec: GraphSpec, out_dir: Path) -> Path:
    """Trace `module` to out_dir/model.onnx in fp32 (the recipes start from it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    trace_to = out_dir / "trace" / "model.onnx" if n_bytes > EXTERNAL_DATA_THRESHOLD else path
    trace_to.parent.mkdir(exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(trace_to), dynamo=False, opset_version=OPSET,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )
    if trace_to != path:  # gather the exporter's per-tensor files into one data file
        import onnx

        save_graph(onnx.load(str(trace_to), load_external_data=True), path)
        import shutil

        shutil.rmtree(trace_to.parent)
    dedupe_in_place(path)
    return path


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


def export_graph(model: torch.nn.Module, spec: GraphSpec, sizes: dict[str, int], out_dir: Path,
                 threshold_db: float) -> list[ParityResult]:
    """Trace one component to out_dir/model.onnx on its description's sample inputs, then check the graph
    against PyTorch on the same inputs (PSNR >= threshold_db per output)."""
    feeds = spec.sample_inputs(sizes)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    module = WRAPPERS[spec.component](model, spec).eval()
    path = _write_graph(module, args, spec, out_dir)
    return _parity(path, spec, _torch_outputs(module, args, spec), feeds, threshold_db)
