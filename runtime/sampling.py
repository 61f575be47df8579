"""Samplers: pure functions over NumPy arrays.

Two families, as in the literature:
- sigma space (Karras et al. 2022, "Elucidating the design space", k-diffusion):
  x = x_vp * sqrt(1 + sigma^2); `denoise(x, sigma, t)` returns the model's x0.
- alpha space (DDPM/DDIM/PNDM): x is the variance-preserving sample x_t;
  `predict(x, t)` returns (noise, x0), both taken from the network output directly, so
  alpha_bar = 0 (zero terminal SNR) stays finite.
Every sampler has one signature, `sample_x(model, x, schedule, args)` (as k-diffusion's sampling.py), and
`samplers.py` is the one table that says which runs which scheduler configuration.
Each step uses the schedule arrays it is given; no sampler keeps hidden state.
The network, guidance and prediction-type conversion live in `denoiser.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Protocol

import numpy as np

# noise(shape) -> standard normal array
NoiseFn = Callable[[tuple], np.ndarray]
StepCallback = Callable[[int, int], None]
# limit_x0(x0) -> x0: clipping or dynamic thresholding of the clean-sample estimate
LimitFn = Callable[[np.ndarray], np.ndarray]
# after_step(x, i) -> x: x once step i is done (at the schedule's next noise level); inpainting blends here
StepHook = Callable[[np.ndarray, int], np.ndarray]


class Model(Protocol):
    """What a sampler calls: the denoiser layer (denoiser.py) or a stand-in."""

    def denoise(self, x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        """x0 estimate in sigma space (x = x_vp * sqrt(1 + sigma^2))."""

    def predict(self, x_t: np.ndarray, t: float) -> "tuple[np.ndarray, np.ndarray]":
        """(noise, x0) estimates for the variance-preserving sample x_t."""


@dataclass(frozen=True)
class SamplerArgs:
    """Everything a sampler takes besides the model, x and the schedule (one signature for all samplers)."""

    noise: NoiseFn | None = None  # fresh standard-normal noise, for stochastic samplers
    callback: StepCallback | None = None  # after each model call: callback(call, total calls)
    options: Mapping[str, Any] = field(default_factory=dict)  # the scheduler config's keys (solver_order, ...)
    eta: float | None = None  # DDIM's eta, TCD's gamma
    limit_x0: LimitFn | None = None  # alpha-space samplers limit x0 themselves; sigma-space ones get it applied
    after_step: StepHook | None = None

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def step_done(self, x: np.ndarray, i: int) -> np.ndarray:
        return x if self.after_step is None else self.after_step(x, i)


@dataclass(frozen=True)
class SigmaSchedule:
    """Sigma-space plan: model timesteps (n,), sigmas (n+1,) ending at the final sigma."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float
    # DPM2 only: the midpoint of each step in log sigma and its model timestep, (n,)
    mid_sigmas: np.ndarray | None = None
    mid_timesteps: np.ndarray | None = None
    start: int = 0  # first step to take: > 0 starts part-way (img2img); see starting_at()


@dataclass(frozen=True)
class AlphaSchedule:
    """Alpha-space plan: the timesteps (n,) to call the model at and the step size in train steps."""

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray  # (num_train_timesteps,)
    final_alpha_cumprod: float  # alpha_bar used past t = 0
    step_ratio: int  # num_train_timesteps // num_inference_steps
    start: int = 0  # first model call: > 0 starts part-way (img2img); see starting_at()


def starting_at(s, step: int):
    """The schedule `s` entered at `step` (img2img's strength): the steps before it are skipped.

    Samplers keep the full arrays, as diffusers' schedulers do with a begin index: multistep samplers
    start with an empty history, and decisions that depend on the schedule's length stay the same.
    """
    return replace(s, start=step)


def clip_x0(limit: float) -> LimitFn:
    return lambda x0: np.clip(x0, -limit, limit)


def dynamic_threshold_x0(ratio: float, max_value: float) -> LimitFn:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per sample, clip x0 to the `ratio`
    quantile s of |x0| (s kept within [1, max_value]) and divide by s."""
    def limit(x0: np.ndarray) -> np.ndarray:
        flat = x0.reshape(x0.shape[0], -1)
        s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1.0, max_value)[:, None].astype(x0.dtype)
        return (np.clip(flat, -s, s) / s).reshape(x0.shape)
    return limit


def _notify(callback: StepCallback | None, i: int, n: int) -> None:
    """Report model call i (0-based) of n."""
    if callback is not None:
        callback(i + 1, n)


def sample_euler(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    denoise, callback = model.denoise, a.callback
    n = len(s.timesteps)
    for i in range(s.start, n):
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        d = (x - denoise(x, sigma, s.timesteps[i])) / sigma  # dx/dsigma
        x = a.step_done(x + d * (sigma_next - sigma), i)
        _notify(callback, i - s.start, n - s.start)
    return x


def sample_heun(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn); Euler on the final step to 0.

    Each step but the last evaluates the model twice (at sigma and at the next sigma): 2n - 1 calls.
    """
    callback = a.callback

    def d_at(x_, sigma, t):
        return (x_ - model.denoise(x_, sigma, t)) / sigma  # dx/dsigma

    n = len(s.timesteps)
    calls, total = 0, 2 * (n - s.start) - 1
    for i in range(s.start, n):
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        dt = sigma_next - sigma
        d = d_at(x, sigma, s.timesteps[i])
        calls += 1
        _notify(callback, calls - 1, total)
        if sigma_next == 0:
            x = a.step_done(x + d * dt, i)
            continue
        d_next = d_at(x + d * dt, sigma_next, s.timesteps[i + 1])
        calls += 1
        _notify(callback, calls - 1, total)
        x = a.step_done(x + (d + d_next) / 2 * dt, i)
    return x


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Weights of the last `order` derivatives for the step sigma_i -> sigma_{i+1}.

    Linear multistep (Adams-Bashforth in sigma): integrate each Lagrange basis polynomial over the
    nodes sigma_i, sigma_{i-1}, ... across the step (Karras et al. 2022; k-diffusion's sample_lms).
    """
    nodes = sigmas[i - np.arange(order)].astype(np.float64)
    weights = []
    for j in range(order):
        others = np.delete(nodes, j)
        basis = np.poly1d(others, r=True) / np.prod(nodes[j] - others)  # 1 at node j, 0 at the others
        integral = basis.integ()
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


def sample_lms(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """Linear multistep over the derivatives of the last 4 steps (fewer at the start)."""
    denoise, callback, order = model.denoise, a.callback, 4
    n = len(s.timesteps)
    history: list[np.ndarray] = []  # derivatives, oldest first
    for i in range(s.start, n):
        sigma = s.sigmas[i]
        d = (x - denoise(x, sigma, s.timesteps[i])) / sigma
        history = (history + [d])[-order:]
        # As diffusers: the weights' order follows the step index; started part-way, the history is shorter
        # and only its first len(history) weights apply.
        weights = lms_coefficients(s.sigmas, i, min(i + 1, order))
        x = a.step_done(x + sum(np.float32(w) * d_ for w, d_ in zip(weights, reversed(history))), i)
        _notify(callback, i - s.start, n - s.start)
    return x


def ancestral_step(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up."""
    sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


def sample_euler_ancestral(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """Euler steps to sigma_down, then noise up to the next sigma (k-diffusion's euler_ancestral, eta=1)."""
    denoise, noise, callback = model.denoise, a.noise, a.callback
    n = len(s.timesteps)
    for i in range(s.start, n):
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        denoised = denoise(x, sigma, s.timesteps[i])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        x = a.step_done(x + noise(x.shape).astype(x.dtype) * sigma_up, i)
        _notify(callback, i - s.start, n - s.start)
    return x


def _dpm_2(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs, noise: NoiseFn | None):
    """DPM-Solver-2 steps; with `noise`, each step goes to sigma_down and adds fresh noise up to the next sigma."""
    denoise, callback = model.denoise, a.callback
    n = len(s.timesteps)
    total = 2 * (n - s.start) - 1
    for i in range(s.start, n):
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next) if noise is not None else (sigma_next, 0.0)
        d = (x - denoise(x, sigma, s.timesteps[i])) / sigma
        _notify(callback, 2 * (i - s.start), total)
        if i == n - 1:  # the last step is Euler's, to zero
            x = a.step_done(x + d * (0.0 - sigma), i)
            continue
        sigma_mid = s.mid_sigmas[i]
        x_mid = x + d * (sigma_mid - sigma)
        d_mid = (x_mid - denoise(x_mid, sigma_mid, s.mid_timesteps[i])) / sigma_mid
        _notify(callback, 2 * (i - s.start) + 1, total)
        x = x + d_mid * (sigma_down - sigma)
        if noise is not None:
            x = x + noise(x.shape).astype(x.dtype) * np.float32(sigma_up)
        x = a.step_done(x, i)
    return x


def sample_dpm_2(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, midpoint in log sigma; Karras et al. 2022's "DPM2"): 2n - 1 calls.

    `s.mid_sigmas[i]` is the geometric mean of sigma_i and sigma_{i+1}; the last step is Euler's.
    """
    return _dpm_2(model, x, s, a, None)


def sample_dpm_2_ancestral(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DPM2 to each step's sigma_down, then fresh noise up to the next sigma (eta 1).

    `s.mid_sigmas[i]` is the geometric mean of sigma_i and that step's sigma_down.
    """
    return _dpm_2(model, x, s, a, a.noise)


def brownian_pair(noise: NoiseFn, shape: tuple, sigma: float, sigma_mid: float, sigma_next: float):
    """Normalised Brownian increments over [sigma_mid, sigma] and [sigma_next, sigma] (nested intervals).

    As a Brownian tree in sigma gives them (k-diffusion's BrownianTreeNoiseSampler): each is standard
    normal, and they correlate by sqrt((sigma - sigma_mid) / (sigma - sigma_next)).
    """
    first, fresh = noise(shape).astype(np.float32), noise(shape).astype(np.float32)
    c = np.sqrt((sigma - sigma_mid) / (sigma - sigma_next))
    return first, (c * first + np.sqrt(1 - c * c) * fresh).astype(np.float32)


def _exp_step(x: np.ndarray, x0: np.ndarray, sigma: float, sigma_to: float) -> np.ndarray:
    """DPM-Solver++(1) from sigma to sigma_to, exact in log sigma for a constant x0: x0 + (sigma_to / sigma)(x - x0)."""
    return x0 + (sigma_to / sigma) * (x - x0)


def _ancestral_exp_step(x: np.ndarray, x0: np.ndarray, sigma: float, sigma_to: float):
    """DPM-Solver++(1) from sigma down to sigma_to's sigma_down; returns (x, sigma_up)."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_to)
    return _exp_step(x, x0, sigma, sigma_down), sigma_up


def sample_dpmpp_sde(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DPM++ SDE (Lu et al. 2022, DPM-Solver++(2S) with ancestral noise; diffusers' DPMSolverSDEScheduler):
    an SDE half step to the midpoint in log sigma, then the full step from the same start with the
    midpoint's x0. The two noises are nested Brownian increments (`brownian_pair`); the last step is Euler's.
    """
    denoise, noise, callback = model.denoise, a.noise, a.callback
    n = len(s.timesteps)
    total = 2 * (n - s.start) - 1
    for i in range(s.start, n):
        sigma, sigma_next = float(s.sigmas[i]), float(s.sigmas[i + 1])
        x0 = denoise(x, sigma, s.timesteps[i])
        _notify(callback, 2 * (i - s.start), total)
        if sigma_next == 0.0:
            x = a.step_done(x0, i)  # Euler to zero
            continue
        sigma_mid = float(s.mid_sigmas[i])
        z_mid, z_next = brownian_pair(noise, x.shape, sigma, sigma_mid, sigma_next)
        x_mid, up = _ancestral_exp_step(x, x0, sigma, sigma_mid)
        x_mid = x_mid + z_mid * up
        x0_mid = denoise(x_mid, sigma_mid, s.mid_timesteps[i])
        _notify(callback, 2 * (i - s.start) + 1, total)
        x, up = _ancestral_exp_step(x, x0_mid, sigma, sigma_next)
        x = a.step_done(x + z_next * up, i)
    return x


def sample_dpmpp_2s_ancestral(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DPM++ 2S a (Lu et al. 2022, DPM-Solver++(2S) with r = 1/2, to each step's sigma_down, then fresh noise up
    to the next sigma, eta 1; k-diffusion's sample_dpmpp_2s_ancestral, A1111's "DPM++ 2S a").

    `s.mid_sigmas[i]` is the geometric mean of sigma_i and that step's sigma_down (as for DPM2 a). A step whose
    sigma_down is 0 (the last, to sigma 0) is Euler's: x becomes x0.
    """
    denoise, noise, callback = model.denoise, a.noise, a.callback
    n = len(s.timesteps)
    total = 2 * (n - s.start) - int(float(s.sigmas[-1]) == 0.0)
    calls = 0
    for i in range(s.start, n):
        sigma, sigma_next = float(s.sigmas[i]), float(s.sigmas[i + 1])
        x0 = denoise(x, sigma, s.timesteps[i])
        calls += 1
        _notify(callback, calls - 1, total)
        if sigma_next == 0.0:
            x = a.step_done(x0, i)
            continue
        sigma_mid = float(s.mid_sigmas[i])
        x0_mid = denoise(_exp_step(x, x0, sigma, sigma_mid), sigma_mid, s.mid_timesteps[i])
        calls += 1
        _notify(callback, calls - 1, total)
        x, up = _ancestral_exp_step(x, x0_mid, sigma, sigma_next)
        x = a.step_done(x + noise(x.shape).astype(x.dtype) * np.float32(up), i)
    return x


def _deis_coefficients(s_t: float, nodes: list[float]) -> list[float]:
    """DEIS-AB weights (Zhang & Chen 2023, arXiv:2204.13902, "logrho"): the integral over rho from nodes[0]
    to s_t of each Lagrange basis polynomial in log rho through `nodes` (rho = sigma, newest node first)."""
    logs = [np.log(r) for r in nodes]

    def integral(j: int, r: float) -> float:  # antiderivative of basis j, up to a constant
        others = [logs[k] for k in range(len(nodes)) if k != j]
        denominator = np.prod([logs[j] - o for o in others])
        lr = np.log(r)
        if len(others) == 1:  # linear basis: (log r - c) / (log b - log c)
            return r * (lr - 1 - others[0]) / denominator
        c, d = others  # quadratic basis: (log r - c)(log r - d) / ((b - c)(b - d))
        return r * (lr * lr - 2 * lr + 2 - (c + d) * (lr - 1) + c * d) / denominator

    return [integral(j, s_t) - integral(j, nodes[0]) for j in range(len(nodes))]


def sample_deis(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DEIS multistep (exponential integrator with Adams-Bashforth in log sigma on the noise estimate;
    Zhang & Chen 2023), order 1-3, as diffusers' DEISMultistepScheduler, in sigma space."""
    denoise, callback = model.denoise, a.callback
    order, lower_order_final = a.option("solver_order", 2), a.option("lower_order_final", True)
    n = len(s.timesteps)
    history: list[np.ndarray] = []  # noise estimates, oldest first
    for i in range(s.start, n):
        sigma, sigma_next = float(s.sigmas[i]), float(s.sigmas[i + 1])
        e = (x - denoise(x, sigma, s.timesteps[i])) / sigma
        history = (history + [e])[-order:]
        done = i - s.start  # steps taken since the start (img2img may start part-way)
        this_order = min(order, done + 1, len(history))
        if lower_order_final and n < 15:
            this_order = min(this_order, n - i)  # first order on the last step, at most second before it
        if this_order == 1 or sigma_next == sigma:
            x = x + (sigma_next - sigma) * e  # DDIM / Euler in sigma; no move where the schedule repeats
        else:
            nodes = [float(s.sigmas[i - k]) for k in range(this_order)]
            weights = _deis_coefficients(sigma_next, nodes)
            x = x + sum(np.float32(w) * h for w, h in zip(weights, reversed(history[-this_order:])))
        x = a.step_done(x, i)
        _notify(callback, done, n - s.start)
    return x


def singlestep_orders(n: int, order: int, lower_order_final: bool, final_is_zero: bool) -> list[int]:
    """Per step, the order of DPM-Solver++ singlestep: groups of 1, 2(, 3) ending each group's interval
    (diffusers' get_order_list; an odd number of steps forces lower_order_final, as diffusers does)."""
    if order == 1:
        orders = [1] * n
    elif lower_order_final or n % order:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        orders = [1, 2] * (n // 2)
    if final_is_zero:
        orders[-1] = 1
    return orders


def sample_dpmpp_2s(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DPM-Solver++(2S), singlestep (Lu et al. 2022, arXiv:2211.01095, Alg. 1): a first-order step to the
    intermediate sigma, then the second-order step over the whole interval from the saved start, using
    both x0 estimates ("midpoint" or "heun" weighting, as diffusers' DPMSolverSinglestepScheduler)."""
    denoise, callback, variant = model.denoise, a.callback, a.option("solver_type", "midpoint")
    n = len(s.timesteps)
    orders = singlestep_orders(n, a.option("solver_order", 2), a.option("lower_order_final", False),
                               float(s.sigmas[-1]) == 0.0)
    outputs: list[np.ndarray] = []
    x_start = x
    for i in range(s.start, n):
        sigma, sigma_next = float(s.sigmas[i]), float(s.sigmas[i + 1])
        outputs = (outputs + [denoise(x, sigma, s.timesteps[i])])[-2:]
        if min(orders[i], len(outputs)) == 1:
            x_start = x
            x = outputs[-1] if sigma_next == 0.0 else (sigma_next / sigma) * x - np.expm1(
                np.log(sigma_next) - np.log(sigma)) * outputs[-1]
        else:  # over [sigma_{i-1}, sigma_{i+1}] with the estimates at sigma_{i-1} and sigma_i
            s1 = float(s.sigmas[i - 1])
            h = np.log(s1) - np.log(sigma_next)  # lambda = -log sigma
            r0 = (np.log(s1) - np.log(sigma)) / h
            d0, d1 = outputs[-2], (outputs[-1] - outputs[-2]) / r0
            x = (sigma_next / s1) * x_start - np.expm1(-h) * d0
            if variant == "midpoint":
                x = x - 0.5 * np.expm1(-h) * d1
            else:  # heun
                x = x + (np.expm1(-h) / h + 1.0) * d1
        x = a.step_done(x, i)
        _notify(callback, i - s.start, n - s.start)
    return x


def _dpmpp_multistep(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs, noise: NoiseFn | None):
    """The DPM-Solver++ multistep loop, orders 1-3 (diffusers' DPMSolverMultistepScheduler); the ODE update
    without `noise`, the SDE update (orders 1-2) with it."""
    denoise, callback = model.denoise, a.callback
    order, lower_order_final = a.option("solver_order", 2), a.option("lower_order_final", True)
    n = len(s.timesteps)
    outputs: list[np.ndarray] = []  # x0 estimates, oldest first
    hs: list[float] = []  # the steps h = lambda_next - lambda taken so far (lambda = -log sigma)
    for i in range(s.start, n):
        sigma, sigma_next = float(s.sigmas[i]), float(s.sigmas[i + 1])
        outputs = (outputs + [denoise(x, sigma, s.timesteps[i])])[-3:]
        z = None if noise is None else noise(x.shape).astype(np.float32)  # drawn every step, as diffusers
        if sigma_next == 0.0:
            x = outputs[-1]  # the limit of every update at sigma_next = 0
        else:
            h = np.log(sigma) - np.log(sigma_next)
            short = lower_order_final and n < 15
            this_order = min(order, len(outputs), i - s.start + 1)
            if i == n - 1 and short:
                this_order = 1
            elif i == n - 2 and short:
                this_order = min(this_order, 2)
            x = _dpmpp_update(x, outputs[-this_order:], [*hs[-(this_order - 1):], h] if this_order > 1 else [h],
                              sigma, sigma_next, z)
            hs.append(h)
        x = a.step_done(x, i)
        _notify(callback, i - s.start, n - s.start)
    return x


def _dpmpp_update(x: np.ndarray, m: list[np.ndarray], hs: list[float], sigma: float, sigma_next: float,
                  z: np.ndarray | None) -> np.ndarray:
    """One DPM-Solver++ step from sigma to sigma_next with the x0 estimates `m` (newest last) and the step
    sizes `hs` (this step's last) (Lu et al. 2022, arXiv:2211.01095, Alg. 2 and its third-order form)."""
    h = hs[-1]
    if len(m) == 1:
        d = m[-1]
    elif len(m) == 2:  # D0 + D1 / 2, D1 = (m0 - m1) / r0 (midpoint form)
        d = m[-1] + (m[-1] - m[-2]) / (2.0 * (hs[-2] / h))
    else:
        r0, r1 = hs[-2] / h, hs[-3] / h
        d1_0, d1_1 = (m[-1] - m[-2]) / r0, (m[-2] - m[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_1 = np.expm1(-h)
        return ((sigma_next / sigma) * x - phi_1 * m[-1] + (phi_1 / h + 1.0) * d1
                - ((phi_1 + h) / h**2 - 0.5) * d2)
    if z is None:
        return (sigma_next / sigma) * x - np.expm1(-h) * d
    return (sigma_next / sigma * np.exp(-h)) * x - np.expm1(-2.0 * h) * d \
        + sigma_next * np.sqrt(-np.expm1(-2.0 * h)) * z


def sample_dpmpp_2m(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DPM-Solver++(2M), midpoint form (Lu et al. 2022, arXiv:2211.01095, Alg. 2), in sigma space; order 3
    with solver_order=3.

    With lambda = -log(sigma) and h = lambda_next - lambda, the update is
    x_next = (sigma_next / sigma) x - expm1(-h) D, where D is x0 (first step,
    or the last step when it ends at sigma 0 / is short) or the multistep blend
    x0 + (x0 - x0_prev) / (2 r), r = h_prev / h.
    """
    return _dpmpp_multistep(model, x, s, a, None)


def sample_dpmpp_2m_sde(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """DPM-Solver++(2M) SDE, midpoint form (Lu et al. 2022, arXiv:2211.01095, SDE variant), in sigma space.

    x_next = (sigma_next / sigma) e^{-h} x + (1 - e^{-2h}) D + sigma_next sqrt(1 - e^{-2h}) z,
    with D as in sample_dpmpp_2m. Fresh noise z is drawn every step (also the last), as diffusers does.
    """
    return _dpmpp_multistep(model, x, s, a, a.noise)


def _unipc_system(h: float, rks: list[float], variant: str) -> tuple[np.ndarray, np.ndarray, float]:
    """UniPC's order conditions R rho = b and B(h) for x0 prediction (Zhao et al. 2023, arXiv:2302.04867,
    Alg. 1 and Sec. 3.3): R[k, j] = r_j^k; b_k = k! phi_{k+1}(-h) / B(h); B(h) = -h ("bh1") or e^-h - 1 ("bh2")."""
    hh = -h
    B_h = hh if variant == "bh1" else np.expm1(hh)
    h_phi_k, factorial, b = np.expm1(hh) / hh - 1, 1, []
    for k in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[rk ** (k - 1) for rk in rks] for k in range(1, len(rks) + 1)])
    return R, np.array(b), B_h


def _unipc_update(x: np.ndarray, sig: np.ndarray, i_from: int, i_to: int, outputs: list[np.ndarray],
                  variant: str, new_output: np.ndarray | None = None) -> np.ndarray:
    """One UniPC update from sigma[i_from] to sigma[i_to] with the x0 estimates `outputs` (newest last, the
    newest at i_from): the predictor UniP, or with `new_output` (the estimate at i_to) the corrector UniC."""
    s0, t = sig[i_from], sig[i_to]
    if t == 0.0:
        # The step to sigma 0 has one finite limit, x = the newest x0 estimate, whatever the order or B(h)
        # (diffusers returns NaN there for "bh1", and fails to solve for order > 1 without lower_order_final).
        return outputs[-1] if new_output is None else new_output
    with np.errstate(divide="ignore"):
        h = np.log(s0) - np.log(t)  # lambda = -log sigma; h = inf for the step to sigma 0
    m0 = outputs[-1]
    older = outputs[:-1][::-1]  # m_{-1}, m_{-2}, ...
    rks = [(np.log(s0) - np.log(sig[i_from - k])) / h for k in range(1, len(older) + 1)] + [1.0]
    D1s = [(m - m0) / rk for m, rk in zip(older, rks)]
    R, b, B_h = _unipc_system(h, rks, variant)
    x_base = (t / s0) * x - np.expm1(-h) * m0
    if new_output is None:  # UniP with order len(outputs)
        if not D1s:
            return x_base
        rhos = np.array([0.5]) if len(D1s) == 1 else np.linalg.solve(R[:-1, :-1], b[:-1])
        return x_base - B_h * sum(r * d for r, d in zip(rhos, D1s))
    # UniC with order len(outputs) + 1
    rhos = np.array([0.5]) if not D1s else np.linalg.solve(R, b)
    correction = sum(r * d for r, d in zip(rhos[:-1], D1s)) + rhos[-1] * (new_output - m0)
    return x_base - B_h * correction


def sample_unipc(model: Model, x: np.ndarray, s: SigmaSchedule, a: SamplerArgs) -> np.ndarray:
    """UniPC with x0 prediction (Zhao et al. 2023): at each model call, the UniC corrector first refines
    the previous step with the new estimate, then the UniP predictor takes the next step, with up to
    `order` past estimates. Equal to diffusers' UniPCMultistepScheduler (predict_x0=True), in sigma space.
    """
    denoise, callback = model.denoise, a.callback
    lower_order_final, order = a.option("lower_order_final", True), a.option("solver_order", 2)
    variant, disable_corrector = a.option("solver_type", "bh2"), tuple(a.option("disable_corrector", ()))
    n = len(s.timesteps)
    sig = s.sigmas.astype(np.float64)
    outputs: list[np.ndarray] = []  # x0 estimates, oldest first
    x_last, last_order = None, 1
    for i in range(s.start, n):
        m = denoise(x, float(sig[i]), s.timesteps[i])
        if i > s.start and (i - 1) not in disable_corrector:  # UniC: redo the last step with m
            x = _unipc_update(x_last, sig, i - 1, i, outputs[-last_order:], variant, new_output=m)
        outputs = (outputs + [m])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, min(i - s.start, order) + 1)  # warm-up: fewer estimates at the start
        x_last, last_order = x, this_order
        x = _unipc_update(x, sig, i, i + 1, outputs[-this_order:], variant)
        x = a.step_done(x.astype(np.float32), i)
        _notify(callback, i - s.start, n - s.start)
    return x


def _alpha_at(s: AlphaSchedule, t: int) -> float:
    return float(s.alphas_cumprod[t]) if t >= 0 else s.final_alpha_cumprod


def sample_ddim(model: Model, x: np.ndarray, s: AlphaSchedule, a: SamplerArgs) -> np.ndarray:
    """DDIM (Song et al. 2021, arXiv:2010.02502, Eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like.

    As in diffusers, limiting x0 (clipping, thresholding) leaves the noise direction the model's own estimate.
    """
    predict, callback, limit_x0, noise = model.predict, a.callback, a.limit_x0, a.noise
    eta = a.eta or 0.0
    n = len(s.timesteps)
    for i in range(s.start, n):
        t = int(s.timesteps[i])
        a_t, a_prev = _alpha_at(s, t), _alpha_at(s, t - s.step_ratio)
        e, x0 = predict(x, t)
        if limit_x0 is not None:
            x0 = limit_x0(x0)
        std = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # Eq. 16
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - std**2) * e
        if eta > 0:
            x = x + std * noise(x.shape).astype(np.float32)
        x = a.step_done(x, i)
        _notify(callback, i - s.start, n - s.start)
    return x


def sample_ddpm(model: Model, x: np.ndarray, s: AlphaSchedule, a: SamplerArgs) -> np.ndarray:
    """Ancestral DDPM sampling (Ho et al. 2020, Eq. 7) over the given timesteps, "fixed_small" variance.

    Each step goes to the next listed timestep (alpha_bar = 1 past the last) and adds noise unless t = 0.
    """
    predict, callback, limit_x0, noise = model.predict, a.callback, a.limit_x0, a.noise
    n = len(s.timesteps)
    for i in range(s.start, n):
        t = int(s.timesteps[i])
        a_t = _alpha_at(s, t)
        a_prev = _alpha_at(s, int(s.timesteps[i + 1])) if i + 1 < n else 1.0
        _, x0 = predict(x, t)
        if limit_x0 is not None:
            x0 = limit_x0(x0)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # this step's own alpha and beta
        x = (np.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (np.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)  # posterior variance (Eq. 7)
            x = x + np.sqrt(variance) * noise(x.shape).astype(np.float32)
        x = a.step_done(x, i)
        _notify(callback, i - s.start, n - s.start)
    return x


def consistency_scalings(t: int, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """c_skip, c_out of the consistency-model boundary condition (Song et al. 2023, arXiv:2303.01469, Eq. 7)."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / np.sqrt(scaled**2 + sigma_data**2)


def sample_lcm(model: Model, x: np.ndarray, s: AlphaSchedule, a: SamplerArgs) -> np.ndarray:
    """Latent consistency sampling (Luo et al. 2023, arXiv:2310.04378, Alg. 1): each step predicts the clean
    sample through the consistency boundary condition, then noises it afresh to the next timestep."""
    predict, callback, limit_x0, noise = model.predict, a.callback, a.limit_x0, a.noise
    timestep_scaling = a.option("timestep_scaling", 10.0)
    n = len(s.timesteps)
    for i in range(s.start, n):
        t = int(s.timesteps[i])
        _, x0 = predict(x, t)
        if limit_x0 is not None:
            x0 = limit_x0(x0)
        c_skip, c_out = consistency_scalings(t, timestep_scaling)
        denoised = c_out * x0 + c_skip * x
        if i < n - 1:
            a_next = float(s.alphas_cumprod[int(s.timesteps[i + 1])])
            x = np.sqrt(a_next) * denoised + np.sqrt(1 - a_next) * noise(x.shape).astype(np.float32)
        else:
            x = denoised
        x = a.step_done(x, i)
        _notify(callback, i - s.start, n - s.start)
    return x


def sample_tcd(model: Model, x: np.ndarray, s: AlphaSchedule, a: SamplerArgs) -> np.ndarray:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024,
    arXiv:2402.19159, Alg. 4): denoise to the intermediate timestep s = floor((1 - gamma) t_next), then
    noise forward to t_next. gamma = 0 is deterministic."""
    predict, callback, noise = model.predict, a.callback, a.noise
    gamma = 0.3 if a.eta is None else a.eta
    n = len(s.timesteps)
    for i in range(s.start, n):
        t = int(s.timesteps[i])
        t_next = int(s.timesteps[i + 1]) if i + 1 < n else 0
        t_s = int(np.floor((1 - gamma) * t_next))
        a_next, a_s = float(s.alphas_cumprod[t_next]), float(s.alphas_cumprod[t_s])
        e, x0 = predict(x, t)
        x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * e  # at timestep s
        if gamma > 0 and i < n - 1:
            x = np.sqrt(a_next / a_s) * x + np.sqrt(1 - a_next / a_s) * noise(x.shape).astype(np.float32)
        x = a.step_done(x, i)
        _notify(callback, i - s.start, n - s.start)
    return x


def _plms_transfer(s: AlphaSchedule, x: np.ndarray, t: int, t_prev: int, e: np.ndarray) -> np.ndarray:
    """PNDM's transfer from t to t_prev given a noise estimate (Liu et al. 2022, arXiv:2202.09778, Eq. 9)."""
    a_t, a_prev = _alpha_at(s, t), _alpha_at(s, t_prev)
    denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
    return np.sqrt(a_prev / a_t) * x - (a_prev - a_t) * e / denom


def sample_plms(model: Model, x: np.ndarray, s: AlphaSchedule, a: SamplerArgs) -> np.ndarray:
    """Pseudo linear multistep (PLMS) with diffusers' warm-up that skips the Runge-Kutta steps.

    The first step is taken twice: once with eps(t0), then redone from the same
    start with the mean of eps(t0) and eps(t1) (a second-order start). Later
    steps use Adams-Bashforth weights over the last 2, 3 or 4 noise estimates.
    `s.timesteps` is the model-call list, whose second entry repeats (n + 1 calls).
    """
    callback = a.callback
    n = len(s.timesteps)
    history: list[np.ndarray] = []
    x_start = x
    for i in range(s.start, n):
        t = int(s.timesteps[i])
        e = model.predict(x, t)[0]
        if i == s.start + 1:  # redo the first step with the averaged estimate
            t_from = t + s.step_ratio
            x = _plms_transfer(s, x_start, t_from, t, (e + history[-1]) / 2)
        else:
            history = (history + [e])[-4:]
            if len(history) == 1:
                e_hat = e
            elif len(history) == 2:
                e_hat = (3 * history[-1] - history[-2]) / 2
            elif len(history) == 3:
                e_hat = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            else:
                e_hat = (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]) / 24
            x = _plms_transfer(s, x, t, t - s.step_ratio, e_hat)
        x = a.step_done(x, i)
        _notify(callback, i - s.start, n - s.start)
    return x
