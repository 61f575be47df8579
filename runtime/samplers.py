"""The sampler table: which sampling function runs a scheduler configuration, and how a run is set up.

A new sampler is one function in sampling.py (signature `sample_x(model, x, schedule, args)`) and one entry
in SAMPLER_TABLE; schedulers.py maps a diffusers scheduler class (or our short name) to its entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from .errors import EdgesdError

from . import sampling
from .sampling import SamplerArgs
from .schedulers import SchedulerConfig, alpha_schedule, sigma_schedule

SamplerFn = Callable[[sampling.Model, np.ndarray, object, SamplerArgs], np.ndarray]


@dataclass(frozen=True)
class Sampler:
    run: SamplerFn
    space: Literal["sigma", "alpha"]  # sigma: k-diffusion coordinates; alpha: the VP sample x_t
    # diffusers' DPM-Solver, UniPC and DEIS keep the variance-preserving sample: at a final sigma_min > 0
    # that is ours divided by sqrt(1 + sigma^2) (at sigma 0 they are the same)
    vp_output: bool = False


SAMPLER_TABLE: dict[str, Sampler] = {
    "euler": Sampler(sampling.sample_euler, "sigma"),
    "euler_ancestral": Sampler(sampling.sample_euler_ancestral, "sigma"),
    "heun": Sampler(sampling.sample_heun, "sigma"),
    "lms": Sampler(sampling.sample_lms, "sigma"),
    "dpm_2": Sampler(sampling.sample_dpm_2, "sigma"),
    "dpm_2_ancestral": Sampler(sampling.sample_dpm_2_ancestral, "sigma"),
    "dpmpp_sde": Sampler(sampling.sample_dpmpp_sde, "sigma"),
    "dpmpp_2s_ancestral": Sampler(sampling.sample_dpmpp_2s_ancestral, "sigma"),
    "dpmpp_2s": Sampler(sampling.sample_dpmpp_2s, "sigma", vp_output=True),
    "dpmpp_2m": Sampler(sampling.sample_dpmpp_2m, "sigma", vp_output=True),
    "dpmpp_2m_sde": Sampler(sampling.sample_dpmpp_2m_sde, "sigma", vp_output=True),
    "unipc": Sampler(sampling.sample_unipc, "sigma", vp_output=True),
    "deis": Sampler(sampling.sample_deis, "sigma", vp_output=True),
    "ddim": Sampler(sampling.sample_ddim, "alpha"),
    "ddpm": Sampler(sampling.sample_ddpm, "alpha"),
    "lcm": Sampler(sampling.sample_lcm, "alpha"),
    "tcd": Sampler(sampling.sample_tcd, "alpha"),
    "plms": Sampler(sampling.sample_plms, "alpha"),
}


def sampler_for(sched: SchedulerConfig) -> Sampler:
    return SAMPLER_TABLE[sched.algorithm]


def x0_limit(sched: SchedulerConfig) -> sampling.LimitFn | None:
    """Dynamic thresholding, else clipping, of x0 as the config asks (diffusers' order of precedence)."""
    if sched.config.get("thresholding"):
        return sampling.dynamic_threshold_x0(sched["dynamic_thresholding_ratio"], sched["sample_max_value"])
    if sched.config.get("clip_sample"):
        return sampling.clip_x0(sched["clip_sample_range"])
    return None


class _Limited:
    """A model whose sigma-space x0 estimate is clipped or thresholded (sigma samplers never see the limit)."""

    def __init__(self, model: sampling.Model, limit: sampling.LimitFn):
        self.model, self.limit = model, limit

    def denoise(self, x, sigma, t):
        return self.limit(self.model.denoise(x, sigma, t))

    def predict(self, x_t, t):
        return self.model.predict(x_t, t)


def schedule_for(sched: SchedulerConfig, steps: int, start: int = 0):
    """The sigma or alpha schedule of `sched` for `steps` steps, entered at step `start`."""
    build = sigma_schedule if sampler_for(sched).space == "sigma" else alpha_schedule
    return sampling.starting_at(build(sched, steps), start)


def guidance_boundary(sched: SchedulerConfig, steps: int, start: int, cutoff: float) -> float | None:
    """The train timestep below which no evaluation is guided, when only the first ceil(cutoff x n) of the n steps
    run are (halfway between the last guided step's timestep and the next one's); None: every step is guided."""
    if cutoff >= 1.0:
        return None
    timesteps = np.asarray(schedule_for(sched, steps, start).timesteps, dtype=np.float64)[start:]
    guided = max(1, math.ceil(cutoff * len(timesteps) - 1e-9))
    if guided >= len(timesteps):
        return None
    return float(timesteps[guided - 1] + timesteps[guided]) / 2.0


def noise_at(schedule, step: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x0 noised to the level of `step` of the schedule, in the sampler's coordinates: x0 + sigma n in sigma
    space, q(x_t | x_0) = sqrt(a) x0 + sqrt(1 - a) n in alpha space (Ho et al. 2020, Eq. 4)."""
    if isinstance(schedule, sampling.SigmaSchedule):
        return (x0 + noise * schedule.sigmas[step]).astype(np.float32)
    a = float(schedule.alphas_cumprod[int(schedule.timesteps[step])])
    return (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32)


def run_sampler(sched: SchedulerConfig, model: sampling.Model, noise_x: np.ndarray, steps: int,
                noise: sampling.NoiseFn | None, callback: sampling.StepCallback | None, eta: float | None = None,
                start: int = 0, x0: np.ndarray | None = None,
                after_step: Callable[[object], sampling.StepHook] | None = None) -> np.ndarray:
    """Scale the initial noise as diffusers does and run the sampler `sched` names.

    With `x0` (img2img: the clean latents), noise it to the schedule's step `start` and begin there.
    `after_step(schedule)` makes a hook called with x after each step (inpainting's mask blend).
    """
    sampler = sampler_for(sched)
    if steps > int(sched["num_train_timesteps"]):  # diffusers refuses it too
        raise EdgesdError(f"{steps} steps are more than the model's {sched['num_train_timesteps']} training timesteps",
                          f"use at most {sched['num_train_timesteps']} steps")
    s = schedule_for(sched, steps, start)
    last = int(sched["num_train_timesteps"]) - 1
    # alpha-space samplers index alphas_cumprod by timestep ("leading" spacing + steps_offset 1 at 1000 steps
    # reaches 1000); sigma-space ones interpolate, as diffusers' do
    if sampler.space != "sigma" and float(np.max(s.timesteps)) > last:
        raise EdgesdError(f"{steps} steps of {sched.name} reach timestep {int(np.max(s.timesteps))}, past the "
                          f"model's last ({last}; steps_offset {sched['steps_offset']})",
                          f"use fewer steps (at most {steps - 1}) or another sampler")
    limit = x0_limit(sched)
    if x0 is not None:
        x = noise_at(s, start, x0, noise_x)
    elif sampler.space == "sigma":
        x = noise_x * np.float32(s.init_noise_sigma)
    else:
        x = noise_x
    if sampler.space == "sigma" and limit is not None:
        model = _Limited(model, limit)
    args = SamplerArgs(noise=noise, callback=callback, options=sched.config, eta=eta, limit_x0=limit,
                       after_step=after_step(s) if after_step is not None else None)
    x = sampler.run(model, x, s, args)
    if sampler.vp_output and isinstance(s, sampling.SigmaSchedule):
        x = x / np.sqrt(1.0 + float(s.sigmas[-1]) ** 2)
    return x.astype(np.float32)
