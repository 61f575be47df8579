"""The one description of every graph edgesd exports and runs.

The exporter names its ONNX inputs/outputs and dynamic axes from these specs, and
the runtime checks loaded graphs and the arrays it feeds them against the same
specs. The names follow optimum's ONNX layout, so folders written by
`optimum-cli export onnx` describe themselves the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from .errors import EdgesdError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    # Each dim is a symbolic name (dynamic) or an int (fixed).
    dims: tuple[str | int, ...]
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    # what a sample input holds (export tracing, parity, tests): standard normal, uniform in [-1, 1],
    # token ids (BOS ... EOS), or U-Net timesteps
    fill: Literal["normal", "uniform", "ids", "timestep"] = "normal"

    def sample(self, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
        """A random input of this spec; symbolic dims take their size from `sizes`."""
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)
        if self.fill == "ids":
            ids = rng.integers(0, sizes["vocab"], shape, dtype=np.int64)
            ids[:, 0], ids[:, -1] = sizes["bos"], sizes["eos"]
            return ids
        if self.fill == "timestep":  # one noisy and one nearly clean row, then repeats
            return np.resize(np.array([981.0, 1.0], np.float32), shape)
        if self.fill == "uniform":
            return rng.uniform(-1, 1, shape).astype(np.float32)
        return rng.standard_normal(shape, dtype=np.float32)

    def to_json(self) -> dict:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    component: str  # folder name in the model directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    required_outputs: int = 1  # the first this many outputs must be in a loaded graph; the rest are optional
    # outputs a later step may add to an exported graph (`edgesd deepcache`: the U-Net's deep features); the
    # exporter and its checks leave them out, a loaded graph returns those it has
    added_outputs: tuple[TensorSpec, ...] = ()

    def sample_inputs(self, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs for every input of this graph (what export tracing, parity checks and tests feed)."""
        rng = np.random.default_rng(seed)
        return {t.name: t.sample(sizes, rng) for t in self.inputs}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Symbolic dims per tensor, in the form torch.onnx.export takes."""
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def to_json(self) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


TEXT_ENCODER = GraphSpec(
    component="text_encoder",
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64", "ids"),),
    outputs=(
        TensorSpec("last_hidden_state", ("batch", "sequence", "hidden"), "float32"),
        TensorSpec("pooler_output", ("batch", "hidden"), "float32"),
    ),
)

UNET = GraphSpec(
    component="unet",
    inputs=(
        TensorSpec("sample", ("batch", "channels", "height", "width"), "float32"),
        TensorSpec("timestep", ("batch",), "float32", "timestep"),
        TensorSpec("encoder_hidden_states", ("batch", "sequence", "hidden"), "float32"),
    ),
    outputs=(TensorSpec("out_sample", ("batch", "channels", "height", "width"), "float32"),),
    # DeepCache (edgesd deepcache): the input of the last up block, kept for the shallow graph
    added_outputs=(TensorSpec("deep_features", ("batch", "deep_channels", "deep_height", "deep_width"), "float32"),),
)
DEEP_FEATURES = UNET.added_outputs[0].name
UNET_SHALLOW = "unet_shallow"  # DeepCache's shallow path: the U-Net's inputs and the kept deep features
UNET_TOME = "unet_tome"  # the U-Net with token merging in its self-attention (`edgesd tome`)
# ToMe's share of each merged level's tokens that are merged away, a graph input so one graph takes any ratio
TOME_RATIO = TensorSpec("tome_ratio", (1,), "float32")
# graphs made from the U-Net: they load where the U-Net does (--component-provider unet=...)
UNET_VARIANTS = (UNET_SHALLOW, UNET_TOME)

VAE_DECODER = GraphSpec(
    component="vae_decoder",
    inputs=(TensorSpec("latent_sample", ("batch", "channels", "latent_height", "latent_width"), "float32"),),
    outputs=(TensorSpec("sample", ("batch", 3, "height", "width"), "float32"),),
)

VAE_ENCODER = GraphSpec(
    component="vae_encoder",
    inputs=(TensorSpec("sample", ("batch", 3, "height", "width"), "float32", "uniform"),),
    # Mean and log-variance of the latent distribution, stacked on channels.
    outputs=(TensorSpec("latent_parameters", ("batch", "parameters", "latent_height", "latent_width"), "float32"),),
)

GRAPHS: dict[str, GraphSpec] = {g.component: g for g in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}
REQUIRED_FOR_TEXT_TO_IMAGE = ("text_encoder", "unet", "vae_decoder")

# U-Net inputs beyond sample, timestep and text, by the names optimum gives them.
UNET_EXTRA_INPUTS = {
    "text_embeds": TensorSpec("text_embeds", ("batch", "pooled"), "float32"),  # SDXL: pooled text embedding
    "time_ids": TensorSpec("time_ids", ("batch", 6), "float32"),  # SDXL: original size, crop, target size
    "timestep_cond": TensorSpec("timestep_cond", ("batch", "guidance_embedding"), "float32"),  # LCM: w embedding
}


def unet_spec(extra_inputs: tuple[str, ...] = ()) -> GraphSpec:
    """The U-Net's description with the extra conditioning inputs a family's U-Net takes."""
    return replace(UNET, inputs=UNET.inputs + tuple(UNET_EXTRA_INPUTS[n] for n in extra_inputs))


def unet_shallow_spec(unet: GraphSpec) -> GraphSpec:
    """DeepCache's shallow U-Net (Ma et al. 2023): `unet`'s inputs and the deep features, its output."""
    return GraphSpec(UNET_SHALLOW, unet.inputs + UNET.added_outputs, unet.outputs)


def unet_tome_spec(unet: GraphSpec) -> GraphSpec:
    """The token-merging U-Net (ToMe for SD, Bolya & Hoffman 2023): `unet`'s inputs and the merge ratio."""
    return GraphSpec(UNET_TOME, (*unet.inputs, TOME_RATIO), unet.outputs)


def text_encoder_spec(component: str, pooled: str, hidden_layer: int | None) -> GraphSpec:
    """A CLIP text encoder's description: hidden states, the pooled output named `pooled` (pooler_output, or
    text_embeds for a CLIP with projection) and, for SDXL, the hidden states after layer `hidden_layer`
    (`hidden_states.N`, optimum's name; N counts the embeddings as 0)."""
    outputs = (TensorSpec("last_hidden_state", ("batch", "sequence", "hidden"), "float32"),
               TensorSpec(pooled, ("batch", "projection"), "float32"))
    if hidden_layer is None:
        return replace(TEXT_ENCODER, component=component, outputs=outputs)
    layer = TensorSpec(f"hidden_states.{hidden_layer}", ("batch", "sequence", "hidden"), "float32")
    return replace(TEXT_ENCODER, component=component, outputs=(layer, *outputs), required_outputs=3)


# ONNX type strings as ONNX Runtime reports them.
ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}

FLOAT_DTYPES = {"float32", "float16", "float64"}
INT_DTYPES = {"int64", "int32"}


def check_feed(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> None:
    """Raise a clear error if `feeds` does not fit `spec` (names, rank, consistent dims)."""
    expected = set(spec.input_names)
    if set(feeds) != expected:
        raise EdgesdError(
            f"{spec.component}: got inputs {sorted(feeds)} but the graph takes {sorted(expected)}",
            "this is a bug in the caller; report it",
        )
    bound: dict[str, int] = {}
    for t in spec.inputs:
        a = feeds[t.name]
        if a.ndim != len(t.dims):
            raise EdgesdError(
                f"{spec.component}: input '{t.name}' has shape {a.shape}, expected rank {len(t.dims)} {t.dims}",
                "check the size and batch you asked for",
            )
        for size, dim in zip(a.shape, t.dims):
            if isinstance(dim, int) and size != dim:
                raise EdgesdError(f"{spec.component}: input '{t.name}' has shape {a.shape}, expected {t.dims}")
            if isinstance(dim, str):
                if bound.setdefault(dim, size) != size:
                    raise EdgesdError(
                        f"{spec.component}: dim '{dim}' is {bound[dim]} in one input and {size} in '{t.name}'"
                    )
        kind = "float" if t.dtype in FLOAT_DTYPES else "int"
        if kind == "float" and not np.issubdtype(a.dtype, np.floating):
            raise EdgesdError(f"{spec.component}: input '{t.name}' must be floating point, got {a.dtype}")
        if kind == "int" and not np.issubdtype(a.dtype, np.integer):
            raise EdgesdError(f"{spec.component}: input '{t.name}' must be integer, got {a.dtype}")
