"""The one description of every graph edgesd exports and runs.

The exporter names its ONNX inputs/outputs and dynamic axes from these specs, and
the runtime checks loaded graphs and the arrays it feeds them against the same
specs. The names follow optimum's ONNX layout, so folders written by
`optimum-cli export onnx` describe themselves the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EdgesdError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    # Each dim is a symbolic name (dynamic) or an int (fixed).
    dims: tuple[str | int, ...]
    dtype: str  # numpy dtype name, e.g. "float32", "int64"

    def to_json(self) -> dict:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    component: str  # folder name in the model directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

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
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64"),),
    outputs=(
        TensorSpec("last_hidden_state", ("batch", "sequence", "hidden"), "float32"),
        TensorSpec("pooler_output", ("batch", "hidden"), "float32"),
    ),
)

UNET = GraphSpec(
    component="unet",
    inputs=(
        TensorSpec("sample", ("batch", "channels", "height", "width"), "float32"),
        TensorSpec("timestep", ("batch",), "float32"),
        TensorSpec("encoder_hidden_states", ("batch", "sequence", "hidden"), "float32"),
    ),
    outputs=(TensorSpec("out_sample", ("batch", "channels", "height", "width"), "float32"),),
)

VAE_DECODER = GraphSpec(
    component="vae_decoder",
    inputs=(TensorSpec("latent_sample", ("batch", "channels", "latent_height", "latent_width"), "float32"),),
    outputs=(TensorSpec("sample", ("batch", 3, "height", "width"), "float32"),),
)

VAE_ENCODER = GraphSpec(
    component="vae_encoder",
    inputs=(TensorSpec("sample", ("batch", 3, "height", "width"), "float32"),),
    # Mean and log-variance of the latent distribution, stacked on channels.
    outputs=(TensorSpec("latent_parameters", ("batch", "parameters", "latent_height", "latent_width"), "float32"),),
)

GRAPHS: dict[str, GraphSpec] = {g.component: g for g in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}
REQUIRED_FOR_TEXT_TO_IMAGE = ("text_encoder", "unet", "vae_decoder")


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
