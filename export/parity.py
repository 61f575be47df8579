"""Parity between an exported graph and the PyTorch module it came from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Minimum output PSNR of an fp32 graph against PyTorch (Apple's ml-stable-diffusion uses 35 dB).
FP32_MIN_PSNR_DB = 35.0


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being max |reference| (as Apple's ml-stable-diffusion takes it:
    for a zero-centred output the value range would be up to twice that, 6 dB looser)."""
    reference = reference.astype(np.float64)
    mse = float(np.mean((reference - candidate.astype(np.float64)) ** 2))
    peak = float(np.abs(reference).max()) or 1.0
    if mse == 0.0:
        return float("inf")
    return 10.0 * np.log10(peak**2 / mse)


@dataclass(frozen=True)
class ParityResult:
    component: str
    output: str
    psnr_db: float
    max_abs_error: float
    threshold_db: float

    @property
    def passed(self) -> bool:
        return bool(self.psnr_db >= self.threshold_db)

    def to_json(self) -> dict:
        return {
            "output": self.output,
            "psnr_db": None if np.isinf(self.psnr_db) else round(float(self.psnr_db), 2),
            "max_abs_error": float(self.max_abs_error),
            "threshold_db": float(self.threshold_db),
            "passed": bool(self.passed),
        }


def compare(component: str, output: str, reference: np.ndarray, candidate: np.ndarray,
            threshold_db: float = FP32_MIN_PSNR_DB) -> ParityResult:
    if reference.shape != candidate.shape:
        return ParityResult(component, output, float("-inf"), float("inf"), threshold_db)
    err = float(np.max(np.abs(reference.astype(np.float64) - candidate)))
    value = psnr(reference, candidate) if np.all(np.isfinite(candidate)) else float("-inf")
    return ParityResult(component, output, value, err, threshold_db)
