"""The interface every backend implements: load a graph file, run it on NumPy arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..graphs import GraphSpec


class Graph(Protocol):
    """One loaded graph. Inputs/outputs are addressed by name, never by position."""

    spec: GraphSpec
    path: Path

    def input_dtype(self, name: str) -> np.dtype: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def provider_names() -> list[str]:
    from . import onnxruntime_backend

    return onnxruntime_backend.provider_names()


def load_graph(path: Path, spec: GraphSpec, provider: str, threads: int | None = None) -> Graph:
    """Load `path` with the backend that serves `provider`."""
    from . import onnxruntime_backend

    return onnxruntime_backend.OrtGraph(path, spec, provider, threads)
