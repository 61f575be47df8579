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
from edgesd.graphs import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, GraphSpec

from .parity import ParityResult, compare
from .recipes import dedupe_in_place

OPSET = 17
EXTERNAL_DATA_FILE = "model.onnx_data"
# Protobuf cannot hold a graph over 2 GB; above this the weights go to one external file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


class _TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _Unet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    """Returns the latent distribution's mean and log-variance, (B, 2C, h, w)."""

    def __init__(self, vae):
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


def export_text_encoder(model, out_dir: Path, max_length: int,
                        threshold_db: float) -> list[ParityResult]:
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, max_length), generator=gen, dtype=torch.int64)
    ids[:, 0], ids[:, -1] = model.config.bos_token_id, model.config.eos_token_id
    module = _TextEncoder(model).eval()
    path = _write_graph(module, (ids[:1],), TEXT_ENCODER, out_dir)
    ref = _torch_outputs(module, (ids,), TEXT_ENCODER)
    return _parity(path, TEXT_ENCODER, ref, {"input_ids": ids.numpy()}, threshold_db)


def export_unet(model, out_dir: Path, latent_size: int, context_len: int,
                threshold_db: float) -> list[ParityResult]:
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, cfg.in_channels, latent_size, latent_size, generator=gen)
    timestep = torch.tensor([981.0, 1.0])
    context = torch.randn(2, context_len, cfg.cross_attention_dim, generator=gen)
    module = _Unet(model).eval()
    path = _write_graph(module, (sample, timestep, context), UNET, out_dir)
    ref = _torch_outputs(module, (sample, timestep, context), UNET)
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()}
    return _parity(path, UNET, ref, feeds, threshold_db)


def export_vae_decoder(vae, out_dir: Path, latent_size: int,
                       threshold_db: float) -> list[ParityResult]:
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, vae.config.latent_channels, latent_size, latent_size, generator=gen)
    module = _VaeDecoder(vae).eval()
    path = _write_graph(module, (latents,), VAE_DECODER, out_dir)
    ref = _torch_outputs(module, (latents,), VAE_DECODER)
    return _parity(path, VAE_DECODER, ref, {"latent_sample": latents.numpy()}, threshold_db)


def export_vae_encoder(vae, out_dir: Path, image_size: int,
                       threshold_db: float) -> list[ParityResult]:
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, image_size, image_size, generator=gen) * 2 - 1
    module = _VaeEncoder(vae).eval()
    path = _write_graph(module, (image,), VAE_ENCODER, out_dir)
    ref = _torch_outputs(module, (image,), VAE_ENCODER)
    return _parity(path, VAE_ENCODER, ref, {"sample": image.numpy()}, threshold_db)
