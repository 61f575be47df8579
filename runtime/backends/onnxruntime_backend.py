"""ONNX Runtime backend: any execution provider the installed onnxruntime has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import EdgesdError
from ..graphs import ONNX_TO_NUMPY, GraphSpec, check_feed

# Short provider names users type; full ONNX Runtime names work too.
SHORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def provider_names() -> list[str]:
    available = set(ort.get_available_providers())
    return [short for short, full in SHORT_NAMES.items() if full in available]


def resolve_provider(provider: str) -> str:
    full = SHORT_NAMES.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if full not in available:
        raise EdgesdError(
            f"unknown or unavailable provider '{provider}'",
            f"this onnxruntime offers: {', '.join(provider_names()) or ', '.join(available)}",
        )
    return full


class OrtGraph:
    def __init__(self, path: Path, spec: GraphSpec, provider: str, threads: int | None = None):
        self.path = Path(path)
        self.spec = spec
        full = resolve_provider(provider)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Without the arena, memory goes back after each run: on the SD 1.5 U-Net (512x512, batch 2) peak RSS
        # fell from 8.1 to 6.5 GB, step time within noise (bench/ort_session_memory.py, bench/results/).
        options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=[full])
        except Exception as e:  # onnxruntime raises several unrelated types for a bad file
            reason = str(e).splitlines()[0][:200]
            raise EdgesdError(
                f"{self.path} is not a loadable ONNX graph ({reason})",
                "re-export the model with `edgesd export`",
            ) from None
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [n for n in spec.input_names if n not in self._inputs]
        missing += [n for n in spec.output_names[:1] if n not in outputs]
        extra = [n for n in self._inputs if n not in spec.input_names]
        if missing or extra:
            raise EdgesdError(
                f"{self.path}: graph does not match the {spec.component} description "
                f"(missing {missing}, unexpected inputs {extra})",
                "export it with `edgesd export` or `optimum-cli export onnx`",
            )
        self._outputs = [n for n in spec.output_names if n in outputs]

    def input_dtype(self, name: str) -> np.dtype:
        onnx_type = self._inputs[name].type
        if onnx_type not in ONNX_TO_NUMPY:
            raise EdgesdError(f"{self.path}: input '{name}' has unsupported type {onnx_type}")
        return np.dtype(ONNX_TO_NUMPY[onnx_type])

    def _fit_rank(self, name: str, value: np.ndarray) -> np.ndarray:
        """optimum's U-Net takes one scalar timestep where ours takes one per batch row."""
        if len(self._inputs[name].shape) == 0 and value.ndim == 1:
            if not np.all(value == value[0]):
                raise EdgesdError(f"{self.path}: input '{name}' is a scalar but the batch has different values")
            return value[0]
        return value

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.spec, feeds)
        # Graphs from other exporters may take int32 ids, int64 timesteps or fp16: cast to the graph.
        cast = {k: np.asarray(self._fit_rank(k, v), dtype=self.input_dtype(k), order="C") for k, v in feeds.items()}
        try:
            values = self._session.run(self._outputs, cast)
        except Exception as e:  # a graph that loads but cannot run these shapes
            reason = str(e).splitlines()[0][:240]
            shapes = {k: v.shape for k, v in cast.items()}
            raise EdgesdError(f"{self.path} failed on inputs {shapes} ({reason})",
                              "check the requested size and batch, or re-export the model") from None
        return {name: np.asarray(v, dtype=np.float32) if v.dtype == np.float16 else v
                for name, v in zip(self._outputs, values)}
