"""Scheduler choice and configuration, read the way diffusers reads it.

A model folder's `scheduler/scheduler_config.json` is read with its keys unchanged.
Choosing a sampler by name works like diffusers' `XScheduler.from_config(config)`:
the model's keys that the chosen class knows override the class defaults, the
rest are dropped. A key we do not support with a value other than the default
is an error naming it; nothing is silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from .errors import EdgesdError
from .sampling import AlphaSchedule, SigmaSchedule

Spacing = Literal["linspace", "leading", "trailing"]

# Keys every scheduler class shares, with diffusers' class defaults.
_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

# Dynamic thresholding of x0 (Imagen), where diffusers' class offers it.
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}

# Per class: (keys we implement with their defaults, keys we only accept at their default).
_CLASSES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "DDIMScheduler": (
        {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0,
         **_THRESHOLDING},
        {},
    ),
    "DDPMScheduler": (
        {"timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0, **_THRESHOLDING},
        {"variance_type": "fixed_small"},
    ),
    "PNDMScheduler": (
        {"timestep_spacing": "leading", "set_alpha_to_one": False, "skip_prk_steps": False},
        {},
    ),
    "EulerDiscreteScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "final_sigmas_type": "zero"},
        {
            "interpolation_type": "linear",
            "sigma_min": None,
            "sigma_max": None,
            "timestep_type": "discrete",
        },
    ),
    "EulerAncestralDiscreteScheduler": ({"timestep_spacing": "linspace"}, {}),
    "LCMScheduler": (
        {"original_inference_steps": 50, "timestep_scaling": 10.0, "clip_sample": False, "clip_sample_range": 1.0,
         "set_alpha_to_one": True, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "timestep_spacing": "leading", **_THRESHOLDING},  # diffusers ignores timestep_spacing here too
        {},
    ),
    "TCDScheduler": (
        {"original_inference_steps": 50, "timestep_scaling": 10.0, "clip_sample": False, "clip_sample_range": 1.0,
         "set_alpha_to_one": True, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "timestep_spacing": "leading", **_THRESHOLDING},  # its step neither clips nor thresholds, as diffusers
        {},
    ),
    "DPMSolverSDEScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "beta_start": 0.00085, "beta_end": 0.012,
         "noise_sampler_seed": None},  # our noise comes from the generation's seed
        {},
    ),
    "DEISMultistepScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "lower_order_final": True, "solver_order": 2, **_THRESHOLDING},
        {"algorithm_type": "deis", "solver_type": "logrho", "use_flow_sigmas": False, "flow_shift": 1.0,
         "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    ),
    "DPMSolverSinglestepScheduler": (
        {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
         "final_sigmas_type": "zero", "lower_order_final": False, "solver_order": 2, "solver_type": "midpoint",
         **_THRESHOLDING},
        {"algorithm_type": "dpmsolver++", "lambda_min_clipped": -float("inf"), "variance_type": None,
         "use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    ),
    "KDPM2DiscreteScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "beta_start": 0.00085, "beta_end": 0.012},
        {},
    ),
    "KDPM2AncestralDiscreteScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "beta_start": 0.00085, "beta_end": 0.012},
        {},
    ),
    "UniPCMultistepScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "final_sigmas_type": "zero", "lower_order_final": True, **_THRESHOLDING,
         "solver_order": 2, "solver_type": "bh2", "disable_corrector": []},
        {"predict_x0": True, "solver_p": None,
         "use_flow_sigmas": False, "flow_shift": 1.0,
         "use_dynamic_shifting": False, "sigma_min": None, "sigma_max": None, "shift_terminal": None},
    ),
    "LMSDiscreteScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False},
        {},
    ),
    "HeunDiscreteScheduler": (
        {"timestep_spacing": "linspace", "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "clip_sample": False, "clip_sample_range": 1.0},
        {},
    ),
    "DPMSolverMultistepScheduler": (
        {
            "timestep_spacing": "linspace",
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "final_sigmas_type": "zero",
            "lower_order_final": True,
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            **_THRESHOLDING,
        },
        {
            "solver_type": "midpoint",
            "euler_at_final": False,
            "use_lu_lambdas": False,
            "use_flow_sigmas": False,
            "flow_shift": 1.0,
            "lambda_min_clipped": -float("inf"),
            "variance_type": None,
            "use_dynamic_shifting": False,
        },
    ),
}

# Our short names: (diffusers class, keys forced on top of the model's config, description).
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM, deterministic (eta 0)"),
    "ddpm": ("DDPMScheduler", {}, "DDPM, ancestral (needs many steps)"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PNDM / PLMS, without Runge-Kutta warm-up"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler with Karras sigmas"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler ancestral (fresh noise each step)"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun, second order (2 U-Net calls per step)"),
    "lms": ("LMSDiscreteScheduler", {}, "linear multistep, order 4"),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "linear multistep with Karras sigmas"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC, order 2 predictor-corrector"),
    "dpm2": ("KDPM2DiscreteScheduler", {}, "DPM2, second order (2 U-Net calls per step)"),
    "dpm2-karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "DPM2 with Karras sigmas"),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 ancestral (fresh noise each step)"),
    "dpm2-a-karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True},
                      "DPM2 ancestral with Karras sigmas"),
    "lcm": ("LCMScheduler", {}, "latent consistency (LCM / LCM-LoRA models, 2-8 steps, guidance 1-2)"),
    "tcd": ("TCDScheduler", {}, "trajectory consistency (TCD models; --eta is its gamma, default 0.3)"),
    "dpm++sde": ("DPMSolverSDEScheduler", {}, "DPM++ SDE (2 U-Net calls per step)"),
    "dpm++sde-karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "DPM++ SDE with Karras sigmas"),
    "deis": ("DEISMultistepScheduler", {}, "DEIS multistep, order 2"),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}, "DPM++ 2S, singlestep (not ancestral)"),
    "dpm++2s-karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}, "DPM++ 2S with Karras sigmas"),
    "dpm++2s-a": ("EulerDiscreteScheduler", {}, "DPM++ 2S ancestral (2 U-Net calls per step; no diffusers class)"),
    "dpm++2s-a-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True},
                         "DPM++ 2S ancestral with Karras sigmas"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M with Karras sigmas"),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler",
                           {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
                           "DPM++ 2M SDE with Karras sigmas"),
}
# The names A1111's web UI shows, which many users know their samplers by.
A1111_NAMES = {"DDIM": "ddim", "PLMS": "pndm", "Euler": "euler", "Euler a": "euler-a", "Heun": "heun",
               "LMS": "lms", "LMS Karras": "lms-karras", "UniPC": "unipc",
               "LCM": "lcm", "DPM++ SDE": "dpm++sde", "DPM++ SDE Karras": "dpm++sde-karras",
               "DPM2": "dpm2", "DPM2 Karras": "dpm2-karras", "DPM2 a": "dpm2-a", "DPM2 a Karras": "dpm2-a-karras",
               "DPM++ 2S a": "dpm++2s-a", "DPM++ 2S a Karras": "dpm++2s-a-karras",
               "DPM++ 2M": "dpm++2m", "DPM++ 2M SDE": "dpm++2m-sde",
               "DPM++ 2M SDE Karras": "dpm++2m-sde-karras",
               "DPM++ 2M Karras": "dpm++2m-karras"}
A1111_OF = {ours: theirs for theirs, ours in A1111_NAMES.items()}  # our name -> A1111's
# Per diffusers class: our short name for it, and the algorithm (samplers.SAMPLER_TABLE key) that runs it.
_CLASS_SAMPLERS: dict[str, tuple[str, str]] = {
    "DDIMScheduler": ("ddim", "ddim"), "DDPMScheduler": ("ddpm", "ddpm"), "PNDMScheduler": ("pndm", "plms"),
    "EulerDiscreteScheduler": ("euler", "euler"), "EulerAncestralDiscreteScheduler": ("euler-a", "euler_ancestral"),
    "HeunDiscreteScheduler": ("heun", "heun"), "LMSDiscreteScheduler": ("lms", "lms"),
    "DPMSolverMultistepScheduler": ("dpm++2m", "dpmpp_2m"), "UniPCMultistepScheduler": ("unipc", "unipc"),
    "KDPM2DiscreteScheduler": ("dpm2", "dpm_2"), "KDPM2AncestralDiscreteScheduler": ("dpm2-a", "dpm_2_ancestral"),
    "LCMScheduler": ("lcm", "lcm"), "TCDScheduler": ("tcd", "tcd"), "DPMSolverSDEScheduler": ("dpm++sde", "dpmpp_sde"),
    "DEISMultistepScheduler": ("deis", "deis"), "DPMSolverSinglestepScheduler": ("dpm++2s", "dpmpp_2s"),
}


# Samplers diffusers has no class for: they run k-diffusion's algorithm on the sigma schedule of the class
# named in SAMPLERS (whose config keys they read).
KSampler = Literal["dpmpp_2s_ancestral"]
_K_SAMPLER_NAMES: dict[KSampler, str] = {"dpmpp_2s_ancestral": "dpm++2s-a"}  # before any "-karras"
_K_SAMPLERS: dict[str, KSampler] = {"dpm++2s-a": "dpmpp_2s_ancestral", "dpm++2s-a-karras": "dpmpp_2s_ancestral"}


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler class and its full, validated configuration."""

    class_name: str
    config: dict[str, Any]
    k_sampler: KSampler | None = None  # run this instead of the class's own step (see _K_SAMPLERS)

    def __getitem__(self, key: str) -> Any:
        return self.config[key]

    @property
    def prediction_type(self) -> str:
        return self.config["prediction_type"]

    @property
    def algorithm(self) -> str:
        """The sampling algorithm that runs this configuration: a key of samplers.SAMPLER_TABLE."""
        if self.k_sampler:
            return self.k_sampler
        if self.class_name == "DPMSolverMultistepScheduler" and self.config["algorithm_type"] == "sde-dpmsolver++":
            return "dpmpp_2m_sde"
        return _CLASS_SAMPLERS[self.class_name][1]

    @property
    def is_sigma_space(self) -> bool:
        from .samplers import SAMPLER_TABLE  # the table imports this module

        return SAMPLER_TABLE[self.algorithm].space == "sigma"

    @property
    def name(self) -> str:
        name = _K_SAMPLER_NAMES[self.k_sampler] if self.k_sampler else _CLASS_SAMPLERS[self.class_name][0]
        if self.config.get("algorithm_type") == "sde-dpmsolver++":
            name += "-sde"
        if self.config.get("use_karras_sigmas"):
            name += "-karras"
        return name


def scheduler_names() -> list[str]:
    return list(SAMPLERS)


def resolve_scheduler(choice: str | dict | None, model_config: dict) -> SchedulerConfig:
    """Turn a short name, a diffusers config dict, or None (the model's own) into a SchedulerConfig."""
    if choice is None:
        return _from_dict(model_config.get("_class_name", ""), model_config, {})
    if isinstance(choice, dict):
        return _from_dict(choice.get("_class_name", ""), {**model_config, **choice}, {})
    choice = _canonical_name(choice)
    if choice not in SAMPLERS:
        raise EdgesdError(f"unknown scheduler '{choice}'",
                          f"choose one of: {', '.join(SAMPLERS)} (or A1111's: {', '.join(A1111_NAMES)})")
    class_name, forced, _ = SAMPLERS[choice]
    return replace(_from_dict(class_name, model_config, forced), k_sampler=_K_SAMPLERS.get(choice))


def _canonical_name(choice: str) -> str:
    """Our short name for `choice`, given as ours or as A1111 writes it (any case)."""
    folded = {k.lower(): v for k, v in A1111_NAMES.items()} | {k: k for k in SAMPLERS}
    return folded.get(choice.strip().lower(), choice)


def _from_dict(class_name: str, source: dict, forced: dict) -> SchedulerConfig:
    if class_name not in _CLASSES:
        raise EdgesdError(
            f"scheduler class '{class_name}' is not supported",
            f"use one of {', '.join(_CLASSES)} or pick a sampler by name ({', '.join(SAMPLERS)})",
        )
    implemented, default_only = _CLASSES[class_name]
    defaults = {**_COMMON, **implemented, **default_only}
    config = {k: source.get(k, v) for k, v in defaults.items()}
    config.update(forced)
    for key, default in default_only.items():
        if config[key] != default:
            raise EdgesdError(f"{class_name}: {key}={config[key]!r} is not supported", f"use {key}={default!r}")
    _check_values(class_name, config)
    return SchedulerConfig(class_name, config)


# Values we implement for keys whose allowed values depend on the class.
_CLASS_VALUES: dict[str, dict[str, tuple]] = {
    "DPMSolverMultistepScheduler": {"algorithm_type": ("dpmsolver++", "sde-dpmsolver++"), "solver_order": (1, 2, 3)},
    "DPMSolverSinglestepScheduler": {"solver_order": (1, 2), "solver_type": ("midpoint", "heun")},
    "DEISMultistepScheduler": {"solver_order": (1, 2, 3)},
    "UniPCMultistepScheduler": {"solver_order": (1, 2, 3), "solver_type": ("bh1", "bh2")},
}


def _check_values(class_name: str, c: dict) -> None:
    allowed = {
        "beta_schedule": ("linear", "scaled_linear"),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "final_sigmas_type": ("zero", "sigma_min"),
        **_CLASS_VALUES.get(class_name, {}),
    }
    for key, values in allowed.items():
        if key in c and c[key] not in values and not (key == "beta_schedule" and c["trained_betas"] is not None):
            raise EdgesdError(f"{class_name}: {key}={c[key]!r} is not supported", f"use one of {values}")
    if c["rescale_betas_zero_snr"] and class_name not in _ZERO_SNR_CLASSES:
        names = sorted(n for n, (cls, _, _) in SAMPLERS.items() if cls in _ZERO_SNR_CLASSES)
        raise EdgesdError(f"{class_name}: rescale_betas_zero_snr=True is not supported (diffusers' class has no "
                          "such option)", f"pick a sampler that has it: {', '.join(names)}")
    if not isinstance(c.get("disable_corrector", []), (list, tuple)):
        raise EdgesdError(f"{class_name}: disable_corrector={c['disable_corrector']!r} is not a list",
                          "give the step indices without a corrector, e.g. [0]")
    if class_name == "DPMSolverMultistepScheduler" and c["algorithm_type"] == "sde-dpmsolver++" \
            and c["solver_order"] == 3:
        raise EdgesdError("DPMSolverMultistepScheduler: solver_order=3 with sde-dpmsolver++ is not supported "
                          "(diffusers has no third-order SDE update)", "use solver_order 1 or 2")
    _check_numbers(class_name, c)
    if class_name == "PNDMScheduler" and not c["skip_prk_steps"]:
        raise EdgesdError("PNDMScheduler: skip_prk_steps=False (Runge-Kutta warm-up) is not supported",
                          "set skip_prk_steps to true or use --scheduler pndm")


def _check_numbers(class_name: str, c: dict) -> None:
    """The numbers a schedule is computed from: whole and positive, finite, betas in (0, 1) and not falling."""
    def whole(key: str, low: int) -> None:
        value = c.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise EdgesdError(f"{class_name}: {key}={value!r} must be a whole number >= {low}",
                              "fix the model's scheduler_config.json")
    whole("num_train_timesteps", 1)
    if "steps_offset" in c:
        whole("steps_offset", 0)
    if c.get("trained_betas") is None:
        start, end = c.get("beta_start"), c.get("beta_end")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v < 1
                   for v in (start, end)):
            raise EdgesdError(f"{class_name}: beta_start={start!r} and beta_end={end!r} must be numbers in (0, 1)",
                              "fix the model's scheduler_config.json (SD: 0.00085 and 0.012)")
        if end < start:
            raise EdgesdError(f"{class_name}: beta_end={end} is below beta_start={start}",
                              "fix the model's scheduler_config.json (SD: 0.00085 and 0.012)")


# --- noise schedule ------------------------------------------------------------------------------

# The classes diffusers gives rescale_betas_zero_snr; those in sigma space cap alpha_bar_T at 2**-24.
_ZERO_SNR_CLASSES = ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR and the first is unchanged
    (Lin et al. 2023, arXiv:2305.08891, Algorithm 1), in float32 as diffusers computes it."""
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    root = np.sqrt(np.cumprod(alphas, dtype=np.float64).astype(np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: a fused multiply-add from the nearer end."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    from_start = (step * i + np.float64(a)).astype(np.float32)  # exact product, one rounding: an FMA
    from_end = (np.float64(b) - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, from_start, from_end)


def alphas_cumprod(c: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t for t = 0..T-1 in float32, computed as diffusers does (Ho et al. 2020)."""
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], dtype=np.float32)
    elif c["beta_schedule"] == "linear":
        betas = _linspace_f32(c["beta_start"], c["beta_end"], T)
    else:  # scaled_linear: linear in sqrt(beta), SD's schedule
        betas = _linspace_f32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T) ** 2
    if c.config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alpha_bar = np.cumprod(alphas, dtype=np.float64).astype(np.float32)  # torch accumulates in double
    if c.config.get("rescale_betas_zero_snr") and c.is_sigma_space:
        alpha_bar[-1] = 2.0**-24  # as diffusers: near zero, so the first sigma stays finite
    return alpha_bar


def _spaced_timesteps(spacing: str, n: int, T: int, offset: int) -> np.ndarray:
    """Descending timesteps for n steps (Lin et al. 2023, arXiv:2305.08891, Table 2)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + offset
    return np.round(np.arange(T, 0, -T / n)) - 1  # trailing


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Beta-distribution spacing (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173):
    sigmas at the Beta(0.6, 0.6) quantiles of 1 - linspace(0, 1, n), dense at both ends."""
    q = 1 - np.linspace(0, 1, n)
    return np.array([sigma_min + _beta_ppf(float(p), alpha, beta) * (sigma_max - sigma_min) for p in q])


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularized incomplete beta function I_x(a, b), by bisection (I increases with x)."""
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-15:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _betainc(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def _betainc(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b): its continued fraction (Abramowitz & Stegun 26.5.8) by the
    modified Lentz method; the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction convergent."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(1.0 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))

    def guard(v: float) -> float:
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 300):
        for coefficient in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even term d_2m
                            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd term d_2m+1
            d = 1.0 / guard(1.0 + coefficient * d)
            c = guard(1.0 + coefficient / c)
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction / a


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep of each sigma, interpolating in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_schedule(c: SchedulerConfig, n: int) -> SigmaSchedule:
    """Timesteps and sigmas for the sigma-space samplers, equal to diffusers' set_timesteps."""
    ac = alphas_cumprod(c)
    T = c["num_train_timesteps"]
    train_sigmas = np.sqrt((1 - ac) / ac)  # float32, as diffusers (torch computes pow 0.5 as sqrt)
    log_sigmas = np.log(train_sigmas)
    spacing = c.config.get("timestep_spacing", "linspace")  # DPMSolverSinglestep has none: always linspace
    dpm = c.class_name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                           "DPMSolverSinglestepScheduler")  # same schedule
    if dpm:  # DPM-Solver spaces n + 1 integer points and drops t = 0
        if spacing == "linspace":
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + c["steps_offset"]
        else:
            t = np.arange(T, 0, -T / n).round() - 1
        t = t.astype(np.int64).astype(np.float64)
    else:
        t = _spaced_timesteps(spacing, n, T, c["steps_offset"]).astype(np.float32).astype(np.float64)
    karras, exponential = c.config.get("use_karras_sigmas"), c.config.get("use_exponential_sigmas")
    beta = c.config.get("use_beta_sigmas")
    chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c.config.get(k)]
    if len(chosen) > 1:
        raise EdgesdError(f"{c.class_name}: {' and '.join(chosen)} are set together", "choose one sigma schedule")
    if karras or exponential or beta:
        # DPM-Solver spans the whole training range; the others the range of their spaced schedule.
        spaced = train_sigmas if dpm else np.interp(t, np.arange(T), train_sigmas)[::-1]
        lo, hi = float(spaced[0]), float(spaced[-1])
        if karras:
            sigmas = _karras_sigmas(lo, hi, n)
        elif beta:
            sigmas = _beta_sigmas(lo, hi, n)
        else:  # log-linear from sigma_max to sigma_min
            sigmas = np.exp(np.linspace(np.log(hi), np.log(lo), n))
        t = sigma_to_t(sigmas, log_sigmas)
        if dpm:  # integer timesteps: Karras ones rounded, the others truncated (as diffusers casts them)
            t = t.round() if karras else np.trunc(t)
        elif karras and c.class_name.startswith("KDPM2"):
            t = t.round()
    else:
        sigmas = np.interp(t, np.arange(T), train_sigmas)
    final = float(((1 - ac[0]) / ac[0]) ** 0.5) if c.config.get("final_sigmas_type") == "sigma_min" else 0.0
    if c.class_name == "DEISMultistepScheduler":  # DEIS ends at sigma_min, or repeats its last converted sigma
        final = float(sigmas[-1]) if (karras or exponential or beta) else float(((1 - ac[0]) / ac[0]) ** 0.5)
    sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
    t = t.astype(np.float32)
    max_sigma = float(sigmas.max())
    if dpm:  # DPM-Solver starts from unit-variance noise in alpha space
        init = float(np.sqrt(sigmas[0] ** 2 + 1))
    elif spacing in ("linspace", "trailing"):
        init = max_sigma
    else:
        init = float(np.sqrt(max_sigma**2 + 1))
    if c.class_name.startswith("KDPM2") or c.class_name == "DPMSolverSDEScheduler" or c.k_sampler:
        return _with_midpoints(c, SigmaSchedule(timesteps=t, sigmas=sigmas, init_noise_sigma=init), log_sigmas)
    return SigmaSchedule(timesteps=t, sigmas=sigmas, init_noise_sigma=init)


def _with_midpoints(c: SchedulerConfig, s: SigmaSchedule, log_sigmas: np.ndarray) -> SigmaSchedule:
    """Second evaluation points of DPM2 and DPM++ SDE: halfway in log sigma to the next sigma (DPM2 a and
    DPM++ 2S a: to sigma_down), and their model timesteps."""
    from .sampling import ancestral_step

    here, ahead = s.sigmas[:-1].astype(np.float32), s.sigmas[1:].astype(np.float32)
    if c.class_name == "KDPM2AncestralDiscreteScheduler":  # in float32, as diffusers computes it
        ahead = np.array([ancestral_step(a, b)[0] for a, b in zip(here, ahead)], dtype=np.float32)
    elif c.k_sampler == "dpmpp_2s_ancestral":  # in float64, as the sampler's own sigma_down
        here = here.astype(np.float64)
        ahead = np.array([ancestral_step(float(a), float(b))[0] for a, b in zip(here, ahead)])
    with np.errstate(divide="ignore"):
        mid = np.exp((np.log(here) + np.log(ahead)) / 2).astype(np.float32)  # 0 where the target is 0
    mid_t = sigma_to_t(mid, log_sigmas).astype(np.float32)
    return SigmaSchedule(s.timesteps, s.sigmas, s.init_noise_sigma, mid_sigmas=mid, mid_timesteps=mid_t)


def _consistency_timesteps(c: SchedulerConfig, n: int) -> np.ndarray:
    """LCM / TCD: n of the distillation schedule's original_inference_steps timesteps, evenly by index."""
    original, T = c["original_inference_steps"], c["num_train_timesteps"]
    if n > original:
        raise EdgesdError(f"{c.class_name}: {n} steps is more than original_inference_steps={original}",
                          f"use at most {original} steps (consistency models use 2-8)")
    origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]  # e.g. 999, 979, ..., 19
    return origin[np.floor(np.linspace(0, original, n, endpoint=False)).astype(np.int64)]


def alpha_schedule(c: SchedulerConfig, n: int) -> AlphaSchedule:
    """Timesteps for DDIM / PNDM, equal to diffusers' set_timesteps."""
    ac = alphas_cumprod(c)
    T = c["num_train_timesteps"]
    # DDIM and PNDM use integer timesteps: linspace spacing is rounded.
    if c.class_name in ("LCMScheduler", "TCDScheduler"):
        t = _consistency_timesteps(c, n)
    else:
        t = _spaced_timesteps(c["timestep_spacing"], n, T, c["steps_offset"]).round().astype(np.int64)
    if c.class_name == "PNDMScheduler":
        # PLMS without Runge-Kutta warm-up: the second-highest timestep is called twice.
        ascending = t[::-1]
        t = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
    final = 1.0 if c.config.get("set_alpha_to_one", True) else float(ac[0])  # DDPM: always 1
    return AlphaSchedule(timesteps=t, alphas_cumprod=ac, final_alpha_cumprod=final, step_ratio=T // n)
