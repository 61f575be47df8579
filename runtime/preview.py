"""Step previews: the sampler's current estimate of the clean latents as a picture, cheap enough to show at
every step.

With a separate fast decoder (TAESD via `vae_decoder=`) it decodes the estimate; otherwise a linear map
from latent channels to RGB, fitted once per model by least squares to what its own VAE encoder makes of a
few flat colours and smooth random pictures (so it fits SD 1.x, SDXL or any other latent space without constants from
elsewhere). A model without a VAE encoder previews through its full VAE decoder (exact, slow).
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
from PIL import Image

from .images import to_pil

FIT_PICTURES = 6  # smooth random pictures encoded to fit the map (besides 9 flat colours)
FIT_SIZE = 64  # their side in pixels


def _fit_pictures(count: int, size: int, seed: int = 0) -> np.ndarray:
    """(9 + count, 3, size, size) in [-1, 1]: the RGB cube's corners and mid grey as flat pictures, then
    colour gradients with a soft blob each (saturated colours and smooth content both constrain the map)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    flats = [np.array(c, np.float32) for c in np.ndindex(2, 2, 2)] + [np.full(3, 0.5, np.float32)]
    pictures = [np.broadcast_to((2 * c - 1)[:, None, None], (3, size, size)) for c in flats]
    for _ in range(count):
        corners = rng.uniform(-1, 1, (4, 3))  # bilinear blend of four corner colours, plus one soft blob
        base = ((1 - yy)[..., None] * ((1 - xx)[..., None] * corners[0] + xx[..., None] * corners[1])
                + yy[..., None] * ((1 - xx)[..., None] * corners[2] + xx[..., None] * corners[3]))
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 + 0.1 * r))[..., None] * rng.uniform(-1, 1, 3)
        pictures.append(np.clip(base + blob, -1, 1).transpose(2, 0, 1))
    return np.stack(pictures).astype(np.float32)


def fit_latent_to_rgb(encode: Callable[[np.ndarray], np.ndarray], factor: int) -> np.ndarray:
    """(C + 1, 3): RGB in [-1, 1] ~ [latent, 1] @ map, fitted to the VAE encoder `encode` ((1, 3, H, W) ->
    scaled latents (1, C, H/f, W/f))."""
    rows, targets = [], []
    for picture in _fit_pictures(FIT_PICTURES, FIT_SIZE):
        latent = encode(picture[None])[0]  # (C, h, w)
        c, h, w = latent.shape
        rgb = picture.reshape(3, h, factor, w, factor).mean(axis=(2, 4))  # each latent pixel's mean colour
        rows.append(np.concatenate([latent.reshape(c, -1), np.ones((1, h * w), np.float32)]).T)
        targets.append(rgb.reshape(3, -1).T)
    solution, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)
    return solution.astype(np.float32)


class Previewer:
    """Makes preview pictures for one Pipeline; the linear map is fitted on first use (thread-safe)."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray] | None, decode: Callable[[np.ndarray], list],
                 factor: int, fast_decoder: bool):
        self._encode, self._decode, self._factor = encode, decode, factor
        self._fast_decoder = fast_decoder
        self._map: np.ndarray | None = None
        self._lock = threading.Lock()

    def __call__(self, latents: np.ndarray) -> list[Image.Image]:
        """Scaled latents (N, C, h, w) -> N pictures (h x w for the linear map, full size when decoded)."""
        if self._fast_decoder or self._encode is None:
            return self._decode(latents)
        with self._lock:
            if self._map is None:
                self._map = fit_latent_to_rgb(self._encode, self._factor)
        n, c, h, w = latents.shape
        flat = np.concatenate([latents.transpose(0, 2, 3, 1).reshape(-1, c), np.ones((n * h * w, 1), np.float32)], 1)
        rgb = (flat @ self._map).reshape(n, h, w, 3).transpose(0, 3, 1, 2)
        return to_pil(np.clip(rgb, -1, 1))
