"""The layer between the U-Net graph and the samplers.

It batches cond/uncond into one U-Net call (or two, `split_guidance`), applies classifier-free guidance
(Ho & Salimans 2022), and converts the network's prediction (epsilon, v or x0)
into what a sampler asks for, so samplers never see a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# unet(sample (M, C, h, w), timestep (M,), **cond) -> prediction (M, C, h, w); cond holds every other
# U-Net input by its graph name (encoder_hidden_states, text_embeds, time_ids, timestep_cond, ...)
UnetFn = Callable[..., np.ndarray]


@dataclass
class Denoiser:
    unet: UnetFn
    cond: dict[str, np.ndarray]  # each (2B, ...) as [uncond; cond] when guiding, else (B, ...)
    guidance_scale: float  # classifier-free guidance; <= 1 runs the conditional branch only
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    alphas_cumprod: np.ndarray  # (T,) float32
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023, Sec. 3.4; 0 leaves guidance as it is
    # channels appended to the sample before the U-Net (inpainting: mask and masked-image latents), (B, C', h, w)
    concat: np.ndarray | None = field(default=None)
    # guidance cutoff: only evaluations at train timesteps >= this one are guided; below it the conditional
    # branch runs alone (batch B). None: every evaluation is guided.
    guided_down_to: float | None = None
    # two U-Net calls of batch B per guided evaluation (uncond, then cond) instead of one of 2B: the same result
    # with about half the activation memory, and on CPUs often faster (README, "--guidance-batch")
    split_guidance: bool = False
    latest_x0: np.ndarray | None = field(default=None, repr=False)  # the last clean-latent estimate (previews)
    evaluations: int = field(default=0, init=False)  # network predictions made (a split one is two U-Net runs)
    _halves: tuple | None = field(default=None, init=False, repr=False)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def _guided_at(self, t: float) -> bool:
        return self.guided and (self.guided_down_to is None or t >= self.guided_down_to)

    def _half(self, i: int) -> dict[str, np.ndarray]:
        """The uncond (i = 0) or cond (i = 1) half of each [uncond; cond] conditioning input, each (B, ...);
        made once, so every step passes the same arrays (a backend keeps repeated inputs on its device)."""
        if self._halves is None:
            self._halves = tuple(dict(zip(self.cond, parts))
                                 for parts in zip(*(np.split(v, 2) for v in self.cond.values())))
        return self._halves[i]

    def _call(self, x_in: np.ndarray, t: float, cond: dict[str, np.ndarray]) -> np.ndarray:
        return self.unet(x_in, np.full((x_in.shape[0],), t, dtype=np.float32), **cond)

    def _predict(self, x_vp: np.ndarray, t: float) -> np.ndarray:
        """Guided network output for the VP sample x_vp (B, C, h, w) at train timestep t."""
        self.evaluations += 1
        x_in = x_vp.astype(np.float32)
        if self.concat is not None:
            x_in = np.concatenate([x_in, self.concat], axis=1)  # (B, C + C', h, w)
        if not self._guided_at(t):  # past a guidance cutoff: the conditional half alone
            return self._call(x_in, t, self._half(1) if self.guided else self.cond)
        if self.split_guidance:
            uncond, cond = (self._call(x_in, t, self._half(i)) for i in (0, 1))
        else:
            uncond, cond = np.split(self._call(np.concatenate([x_in, x_in]), t, self.cond), 2)  # (2B, ...) in
        guided = uncond + self.guidance_scale * (cond - uncond)
        if self.guidance_rescale > 0:
            # Rescale the guided prediction to the conditional one's std, per sample (Lin et al. 2023, Eq. 15-16)
            axes = tuple(range(1, guided.ndim))
            rescaled = guided * (cond.std(axis=axes, keepdims=True) / guided.std(axis=axes, keepdims=True))
            guided = self.guidance_rescale * rescaled + (1 - self.guidance_rescale) * guided
        return guided

    def predict(self, x_t: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(noise, x0) estimates for alpha-space samplers, each from the network output directly."""
        out = self._predict(x_t, t)
        alpha_bar = float(self.alphas_cumprod[int(t)])
        a, s = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
        if self.prediction_type == "epsilon":
            eps, x0 = out, (x_t - s * out) / a
        elif self.prediction_type == "v_prediction":  # v = a * eps - s * x0 (Salimans & Ho 2022)
            eps, x0 = a * out + s * x_t, a * x_t - s * out
        else:  # "sample"
            eps, x0 = (x_t - a * out) / s, out
        self.latest_x0 = x0
        return eps, x0

    def denoise(self, x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        """x0 estimate for sigma-space samplers (x = x_vp * sqrt(1 + sigma^2))."""
        c_in = 1.0 / np.sqrt(sigma**2 + 1.0)
        x_vp = x * c_in
        out = self._predict(x_vp, t)
        if self.prediction_type == "epsilon":
            x0 = x - sigma * out
        elif self.prediction_type == "v_prediction":  # Karras et al. 2022, Table 1 scalings
            x0 = out * (-sigma * c_in) + x * c_in**2
        else:
            x0 = out
        self.latest_x0 = x0
        return x0
