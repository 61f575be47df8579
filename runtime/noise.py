"""Where a generation's random numbers come from: one seeded stream for the initial and the per-step noise."""
from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from .errors import EdgesdError
from .sampling import NoiseFn
from .torch_noise import TorchCpuGenerator

# "numpy": NumPy's PCG64 (fast, ours). "torch-cpu": torch's CPU randn bit for bit, so diffusers' seeds carry over.
NoiseGenerator = Literal["numpy", "torch-cpu"]
NOISE_GENERATORS: tuple[str, ...] = get_args(NoiseGenerator)


def noise_source(generator: NoiseGenerator, seed: int) -> NoiseFn:
    """Standard-normal float32 noise of any shape, drawn in call order from `generator` seeded by `seed`."""
    if generator == "torch-cpu":
        return TorchCpuGenerator(seed).randn
    if generator == "numpy":
        rng = np.random.default_rng(seed)
        return lambda shape: rng.standard_normal(shape, dtype=np.float32)
    raise EdgesdError(f"unknown noise generator {generator!r}", f"use one of: {', '.join(NOISE_GENERATORS)}")
