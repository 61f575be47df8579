"""Schedules and sampling loops against diffusers' schedulers, with a stand-in model (no network)."""

import inspect

import numpy as np
import pytest

from edgesd.denoiser import Denoiser
from edgesd.errors import EdgesdError
from edgesd.samplers import run_sampler as _run_sampler
from edgesd.schedulers import alpha_schedule, alphas_cumprod, resolve_scheduler, sigma_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
      "clip_sample": False, "prediction_type": "epsilon"}
NAMES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
         "unipc": "UniPCMultistepScheduler", "euler": "EulerDiscreteScheduler",
         "euler-karras": "EulerDiscreteScheduler", "dpm++2m-sde": "DPMSolverMultistepScheduler",
         "dpm++2m-sde-karras": "DPMSolverMultistepScheduler",
         "euler-a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
         "lms": "LMSDiscreteScheduler", "lms-karras": "LMSDiscreteScheduler",
         "dpm++2m": "DPMSolverMultistepScheduler",
         "dpm++2m-karras": "DPMSolverMultistepScheduler",
         "dpm2": "KDPM2DiscreteScheduler", "dpm2-karras": "KDPM2DiscreteScheduler",
         "dpm2-a": "KDPM2AncestralDiscreteScheduler", "dpm2-a-karras": "KDPM2AncestralDiscreteScheduler",
         "lcm": "LCMScheduler", "tcd": "TCDScheduler",
         "dpm++sde": "DPMSolverSDEScheduler", "dpm++sde-karras": "DPMSolverSDEScheduler",
         "deis": "DEISMultistepScheduler",
         "dpm++2s": "DPMSolverSinglestepScheduler", "dpm++2s-karras": "DPMSolverSinglestepScheduler"}
STEPS = [1, 2, 4, 20, 50]
SPACINGS = ["leading", "linspace", "trailing"]


def diffusers_scheduler(name, config):
    overrides = {"use_karras_sigmas": True} if name.endswith("karras") else {}
    if "-sde" in name:
        overrides["algorithm_type"] = "sde-dpmsolver++"
    if name == "pndm":
        overrides["skip_prk_steps"] = True
    return getattr(diffusers, NAMES[name]).from_config(config, **overrides)


class _SameBrownianNoise:
    """Stands in for diffusers' Brownian-tree noise sampler in DPM++ SDE: the draws our `brownian_pair`
    makes from the same generator, so both loops see the same noise."""

    def __init__(self, generator, shape):
        self.generator, self.shape, self.pending = generator, shape, None

    def __call__(self, sigma, sigma_to):
        sigma, sigma_to = float(sigma), float(sigma_to)
        if self.pending is None:  # first half of a step: [sigma_mid, sigma]
            first, fresh = (torch.randn(self.shape, generator=self.generator) for _ in range(2))
            self.pending = (first, fresh, sigma_to)
            return first
        first, fresh, sigma_mid = self.pending
        self.pending = None
        c = np.sqrt((sigma - sigma_mid) / (sigma - sigma_to))
        return c * first + np.sqrt(1 - c * c) * fresh


def _same_noise(ref, generator, shape):
    if type(ref).__name__ == "DPMSolverSDEScheduler":
        ref.noise_sampler = _SameBrownianNoise(generator, shape)


def stand_in_eps(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth, deterministic 'noise prediction' that depends on the input and the timestep."""
    return (0.8 * np.tanh(x) + 0.1 * np.sin(x * 3.0 + t / 97.0)).astype(np.float32)


def stand_in_denoiser(sched, prediction: str) -> Denoiser:
    """Our denoiser layer around `stand_in_eps`, without guidance."""
    return Denoiser(unet=lambda s, t, **c: stand_in_eps(s, float(t[0])), cond={},
                    guidance_scale=1.0, prediction_type=prediction, alphas_cumprod=alphas_cumprod(sched))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(NAMES))
def test_schedule_equals_diffusers(name, spacing, steps):
    config = {**SD, "timestep_spacing": spacing}
    ref = diffusers_scheduler(name, config)
    ref.set_timesteps(steps)
    ours = resolve_scheduler(name, config)
    if ours.is_sigma_space:
        ref_t, ref_s = ref.timesteps.numpy().astype(np.float32), ref.sigmas.numpy()
        if name == "heun":  # diffusers lists the second-order evaluations as repeated entries
            ref_t = np.concatenate([ref_t[:1], ref_t[1::2]])
            ref_s = np.concatenate([ref_s[:1], ref_s[1:-1:2], ref_s[-1:]])
        if name.startswith("dpm2"):  # timesteps interleave the midpoints; sigmas repeat
            ref_t, ref_s = ref_t[0::2], ref_s[0::2]
        if name.startswith("dpm++sde"):  # timesteps interleave the midpoints; sigmas repeat as Heun's
            ref_t = ref_t[0::2]
            ref_s = np.concatenate([ref_s[:1], ref_s[1:-1:2], ref_s[-1:]])
        s = sigma_schedule(ours, steps)
        np.testing.assert_allclose(s.timesteps, ref_t, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(s.sigmas, ref_s, rtol=1e-6)
        np.testing.assert_allclose(s.init_noise_sigma, float(ref.init_noise_sigma) if not name.startswith(("dpm++2m", "dpm++2s", "unipc", "deis")) else
                                   float(np.sqrt(ref.sigmas[0] ** 2 + 1)), rtol=1e-5)
    else:
        a = alpha_schedule(ours, steps)
        np.testing.assert_array_equal(a.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(alphas_cumprod(ours), ref.alphas_cumprod.numpy())  # bit for bit


# diffusers' PNDM combines raw v-predictions across steps before converting them, so it is checked
# with epsilon only; EulerAncestral, DPM2 and DPM++ SDE have no "sample" prediction in diffusers.
PREDICTIONS = [(n, p) for n in NAMES for p in ("epsilon", "v_prediction", "sample")
               if not (n == "pndm" and p != "epsilon")
               and not (n.startswith(("euler-a", "dpm2", "dpm++sde")) and p == "sample")]


def _both_loops(name, config, steps, prediction="epsilon", eta=0.0):
    """Run diffusers' scheduler and ours over the stand-in model with the same start and noise."""
    shape = (1, 4, 8, 8)
    start = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    ref = diffusers_scheduler(name, config)
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(1)
    _same_noise(ref, gen, shape)
    x = torch.from_numpy(start) * ref.init_noise_sigma
    accepted = inspect.signature(ref.step).parameters
    extra = {k: v for k, v in (("generator", gen), ("eta", eta)) if k in accepted}
    for t in ref.timesteps:
        inp = ref.scale_model_input(x, t)
        eps = torch.from_numpy(stand_in_eps(inp.numpy(), float(t)))
        x = ref.step(eps, t, x, **extra).prev_sample
    expected = x.numpy()

    sched = resolve_scheduler(name, config)
    denoiser = stand_in_denoiser(sched, prediction)
    gen2 = torch.Generator().manual_seed(1)
    got = _run_sampler(sched, denoiser, start, steps, lambda s: torch.randn(s, generator=gen2).numpy(), None, eta)
    scale = np.abs(expected).max()
    if name == "heun":
        # Heun's corrector divides a difference of values as large as the initial noise (~15x) by the next
        # sigma; from sigma_max straight to sigma_min (2 steps) float32 rounding then reaches ~5e-4 either way.
        scale = max(scale, float(np.abs(start).max() * ref.init_noise_sigma))
    return got, expected, scale


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name, prediction", PREDICTIONS)
def test_sampling_loop_equals_diffusers(name, prediction, spacing, steps):
    """The whole loop with the stand-in model: ours (NumPy) vs diffusers' scheduler (torch), same noise."""
    config = {**SD, "timestep_spacing": spacing, "prediction_type": prediction}
    got, expected, scale = _both_loops(name, config, steps, prediction)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=_loop_tolerance(name, spacing, steps) * scale)


def _loop_tolerance(name, spacing, steps):
    if name.startswith("dpm2-a") and spacing == "linspace" and steps == 2:
        # From sigma_max (14.6) to sigma_min (0.029), sigma_down = sqrt(s1^2 - s_up^2) cancels to 2e-4 of s1
        # in float32: torch's float32 sqrt, one ulp off numpy's in 19% of the training sigmas, moves it by 2%.
        return 3e-3
    return 1e-5


@pytest.mark.parametrize("steps", [2, 4, 20])
@pytest.mark.parametrize("name, extra, eta", [
    ("ddim", {"clip_sample": True}, 0.0),  # clipping bounds x0; the noise direction stays the model's
    ("ddpm", {"clip_sample": True}, 0.0),
    ("heun", {"clip_sample": True}, 0.0),
    ("ddim", {}, 0.5),
    ("ddim", {}, 1.0),
    ("ddim", {"clip_sample": True, "set_alpha_to_one": True}, 0.3),
    ("ddim", {"thresholding": True, "sample_max_value": 2.5}, 0.0),  # dynamic thresholding wins over clipping
    ("ddim", {"thresholding": True, "clip_sample": True, "dynamic_thresholding_ratio": 0.9}, 0.0),
    ("ddpm", {"thresholding": True, "sample_max_value": 2.5}, 0.0),
    ("dpm++2m", {"thresholding": True, "sample_max_value": 2.5}, 0.0),
    ("dpm++2m-sde", {"thresholding": True, "sample_max_value": 2.5}, 0.0),
    ("unipc", {"thresholding": True, "sample_max_value": 2.5}, 0.0),
    ("lcm", {"clip_sample": True, "clip_sample_range": 0.5}, 0.0),
    ("lcm", {"thresholding": True, "sample_max_value": 2.5}, 0.0),
    ("lcm", {"original_inference_steps": 20, "timestep_scaling": 5.0}, 0.0),
    ("tcd", {}, 0.3),  # TCD's gamma, passed as eta as diffusers' pipelines pass it
    ("tcd", {}, 1.0),
])
def test_clipping_thresholding_and_eta_equal_diffusers(name, extra, eta, steps):
    got, expected, scale = _both_loops(name, {**SD, **extra}, steps, eta=eta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("config, needle", [
    ({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "sideways"}, "timestep_spacing='sideways'"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}, "solver_order=4 is not supported"),
    ({"_class_name": "HeunDiscreteScheduler", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr.*euler-a"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": False}, "skip_prk_steps=False"),
    ({"_class_name": "FlowMatchHeunDiscreteScheduler"}, "FlowMatchHeunDiscreteScheduler"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_order": 4}, "solver_order=4 is not supported"),
    ({"_class_name": "UniPCMultistepScheduler", "disable_corrector": 0}, "disable_corrector=0 is not a list"),
    ({"_class_name": "DEISMultistepScheduler", "solver_type": "bh2"}, "solver_type='bh2' is not supported"),
    ({"_class_name": "DPMSolverSinglestepScheduler", "solver_order": 3}, "solver_order=3 is not supported"),
    ({"_class_name": "DPMSolverSinglestepScheduler", "algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver'"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_beta_sigmas": True,
      "timestep_spacing": "trailing"}, None),
])
def test_unsupported_configs_are_named(config, needle):
    if needle is None:  # accepted, but refused once the schedule is built
        with pytest.raises(EdgesdError, match="use_karras_sigmas and use_beta_sigmas are set together"):
            sigma_schedule(resolve_scheduler(config, SD), 10)
        return
    with pytest.raises(EdgesdError, match=needle):
        resolve_scheduler(config, SD)


@pytest.mark.parametrize("a1111, ours", [("DPM++ 2M Karras", "dpm++2m-karras"), ("Euler a", "euler-a"),
                                         ("euler A", "euler-a"), ("PLMS", "pndm"), ("DDIM", "ddim"),
                                         ("Heun", "heun"), ("LMS Karras", "lms-karras"),
                                         ("DPM++ 2M SDE Karras", "dpm++2m-sde-karras"),
                                         ("DPM++ 2S a Karras", "dpm++2s-a-karras"), ("DPM++ 2S a", "dpm++2s-a")])
def test_a1111_names(a1111, ours):
    assert resolve_scheduler(a1111, SD) == resolve_scheduler(ours, SD)


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", ["exponential", "beta"])
@pytest.mark.parametrize("name", ["euler", "heun", "lms", "unipc", "dpm++2m", "dpm++2m-sde", "dpm2", "dpm2-a",
                                  "dpm++sde", "deis"])
def test_exponential_and_beta_sigmas_equal_diffusers(name, kind, spacing, steps):
    """use_exponential_sigmas / use_beta_sigmas (diffusers computes the Beta quantiles with scipy; we do not)."""
    config = {**SD, "timestep_spacing": spacing, f"use_{kind}_sigmas": True}
    ref = diffusers_scheduler(name, config)
    ref.set_timesteps(steps)
    s = sigma_schedule(resolve_scheduler(name, config), steps)
    ref_t, ref_s = ref.timesteps.numpy().astype(np.float32), ref.sigmas.numpy()
    if name == "heun":
        ref_t = np.concatenate([ref_t[:1], ref_t[1::2]])
        ref_s = np.concatenate([ref_s[:1], ref_s[1:-1:2], ref_s[-1:]])
    if name.startswith("dpm2"):
        ref_t, ref_s = ref_t[0::2], ref_s[0::2]
    if name == "dpm++sde":
        ref_t, ref_s = ref_t[0::2], np.concatenate([ref_s[:1], ref_s[1:-1:2], ref_s[-1:]])
    np.testing.assert_allclose(s.sigmas, ref_s, rtol=1e-6)
    np.testing.assert_allclose(s.timesteps, ref_t, rtol=1e-6, atol=1e-4)
    got, expected, scale = _both_loops(name, config, steps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=_loop_tolerance(name, spacing, steps) * scale)


def test_two_sigma_schedules_at_once_is_an_error():
    with pytest.raises(EdgesdError, match="use_karras_sigmas and use_exponential_sigmas are set together"):
        sigma_schedule(resolve_scheduler({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True,
                                          "use_exponential_sigmas": True}, SD), 10)


def _both_img2img_loops(name, config, steps, strength):
    """diffusers' img2img recipe (set_begin_index, add_noise at the first kept timestep) vs ours."""
    from edgesd.pipeline import strength_start

    shape = (1, 4, 8, 8)
    rng = np.random.default_rng(3)
    x0, start_noise = rng.standard_normal(shape).astype(np.float32) * 0.5, rng.standard_normal(shape).astype(np.float32)

    ref = diffusers_scheduler(name, config)
    ref.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = ref.timesteps[t_start * ref.order:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    x = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(start_noise), timesteps[:1])
    gen = torch.Generator().manual_seed(1)
    _same_noise(ref, gen, shape)
    extra = {"generator": gen} if "generator" in inspect.signature(ref.step).parameters else {}
    for t in timesteps:
        inp = ref.scale_model_input(x, t)
        x = ref.step(torch.from_numpy(stand_in_eps(inp.numpy(), float(t))), t, x, **extra).prev_sample
    expected = x.numpy()

    sched = resolve_scheduler(name, config)
    denoiser = stand_in_denoiser(sched, "epsilon")
    gen2 = torch.Generator().manual_seed(1)
    assert strength_start(steps, strength) == t_start
    got = _run_sampler(sched, denoiser, start_noise, steps, lambda s: torch.randn(s, generator=gen2).numpy(), None,
                       start=t_start, x0=x0)
    return got, expected


@pytest.mark.parametrize("steps, strength", [(4, 0.5), (20, 0.3), (20, 0.75), (20, 1.0), (50, 0.6)])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", list(NAMES))
def test_img2img_start_equals_diffusers(name, spacing, steps, strength):
    """Starting part-way (img2img strength): same kept timesteps, same noising, same loop as diffusers."""
    got, expected = _both_img2img_loops(name, {**SD, "timestep_spacing": spacing}, steps, strength)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


STOCHASTIC = [("euler-a", None), ("dpm2-a", None), ("dpm2-a-karras", None), ("dpm++2m-sde", None),
              ("dpm++2m-sde-karras", None), ("dpm++sde", None), ("dpm++sde-karras", None), ("ddpm", None), ("ddim", 1.0), ("lcm", None), ("tcd", 0.3),
              ("tcd", 1.0)]


@pytest.mark.parametrize("name, eta", STOCHASTIC)
def test_stochastic_samplers_with_our_noise_match_diffusers_statistics(name, eta):
    """Our NumPy noise instead of torch's: different samples, the same distribution as diffusers' output.

    The stand-in model is the exact noise predictor for Gaussian data N(0, 0.5^2), so every sample is
    meaningful; 131,072 values estimate the mean and std to about 0.3% (seed to seed).
    """
    data_std, steps = 0.5, (4 if name in ("lcm", "tcd") else 20)
    config = {**SD, "timestep_spacing": "trailing"}
    sched = resolve_scheduler(name, config)
    ac = alphas_cumprod(sched)

    def exact_eps(sample: np.ndarray, t: float) -> np.ndarray:  # E[noise | x_t] for x_0 ~ N(0, data_std^2)
        a = np.interp(t, np.arange(len(ac)), ac)
        return (np.sqrt(1 - a) * sample / (a * data_std**2 + 1 - a)).astype(np.float32)

    start = np.random.default_rng(0).standard_normal((8, 4, 64, 64)).astype(np.float32)
    ref = diffusers_scheduler(name, config)
    ref.set_timesteps(steps)
    if hasattr(ref, "noise_sampler_seed"):  # DPM++ SDE: diffusers' real Brownian tree (torchsde)
        ref.noise_sampler_seed = 3
    gen = torch.Generator().manual_seed(1)
    extra = {k: v for k, v in (("generator", gen), ("eta", eta)) if k in inspect.signature(ref.step).parameters}
    x = torch.from_numpy(start) * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = ref.scale_model_input(x, t)
        x = ref.step(torch.from_numpy(exact_eps(inp.numpy(), float(t))), t, x, **extra).prev_sample
    expected = x.numpy()

    denoiser = Denoiser(unet=lambda s, t, **c: exact_eps(s, float(t[0])), cond={},
                        guidance_scale=1.0, prediction_type="epsilon", alphas_cumprod=ac)
    rng = np.random.default_rng(2)
    got = _run_sampler(sched, denoiser, start, steps, lambda shape: rng.standard_normal(shape, dtype=np.float32),
                       None, eta)
    assert np.abs(got - expected).mean() > 0.01  # really other noise
    assert abs(got.mean() - expected.mean()) < 0.01
    assert got.std() == pytest.approx(expected.std(), rel=0.015)
    if name not in ("lcm", "tcd"):  # a consistency sampler needs a distilled model to reach the data's spread
        assert got.std() == pytest.approx(data_std, rel=0.25)


ZERO_SNR = [n for n in NAMES if NAMES[n] in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler",
                                             "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                             "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")]


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("name", ZERO_SNR)
def test_zero_terminal_snr_equals_diffusers(name, steps):
    """rescale_betas_zero_snr with v-prediction and trailing spacing (Lin et al. 2023), as such models ship."""
    config = {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    ref = diffusers_scheduler(name, config)
    np.testing.assert_allclose(alphas_cumprod(resolve_scheduler(name, config)), ref.alphas_cumprod.numpy(),
                               rtol=1e-5, atol=1e-9)  # float32 cancellation near the last, tiny values
    got, expected, scale = _both_loops(name, config, steps, "v_prediction")
    assert np.isfinite(got).all()
    sched = resolve_scheduler(name, config)
    if sched.is_sigma_space:
        # sigma_max is 4096 here: float32 holds x ~ 4096 * noise to ~5e-4, so the first step's rounding carries
        # into results of size 1 in any float32 implementation; allow a few ulps of that.
        start_max = 3.5  # |standard normal| of the 256 start values stays below this
        scale = max(scale, 4 * float(np.finfo(np.float32).eps) * sigma_schedule(sched, steps).init_noise_sigma
                    * start_max / 1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("extra", [{"solver_order": 1}, {"solver_order": 3}, {"disable_corrector": [0, 2]},
                                   {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                                   {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                                   {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
                                   {"solver_order": 3, "prediction_type": "v_prediction"}])
def test_unipc_orders_and_variants_equal_diffusers(extra, steps):
    config = {**SD, "timestep_spacing": "trailing", **extra}
    got, expected, scale = _both_loops("unipc", config, steps, config["prediction_type"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("extra", [{"solver_type": "bh1"}, {"solver_order": 3, "lower_order_final": False}])
def test_unipc_step_to_zero_stays_finite(extra):
    """Where diffusers gives NaN (bh1) or cannot solve (order 3 at sigma 0), the last step returns its x0."""
    config = {**SD, "timestep_spacing": "trailing", **extra}
    sched = resolve_scheduler("unipc", config)
    denoiser = stand_in_denoiser(sched, "epsilon")
    start = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.isfinite(_run_sampler(sched, denoiser, start, 10, None, None)).all()


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ["euler", "unipc", "dpm++2m", "dpm++2m-karras", "dpm++2m-sde"])
def test_final_sigma_min_equals_diffusers(name, spacing, steps):
    """final_sigmas_type="sigma_min": the last step stops at the smallest training sigma, not at 0."""
    config = {**SD, "timestep_spacing": spacing, "final_sigmas_type": "sigma_min"}
    got, expected, scale = _both_loops(name, config, steps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("extra", [{"solver_order": 1}, {"solver_order": 3},
                                   {"solver_order": 3, "use_karras_sigmas": True},
                                   {"solver_order": 3, "lower_order_final": False},
                                   {"thresholding": True, "sample_max_value": 2.5}])
def test_deis_orders_and_options_equal_diffusers(extra, steps):
    config = {**SD, "timestep_spacing": "trailing", **extra}
    got, expected, scale = _both_loops("deis", config, steps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 20])
@pytest.mark.parametrize("extra", [{"solver_order": 1}, {"solver_type": "heun"}, {"lower_order_final": True},
                                   {"final_sigmas_type": "sigma_min"}, {"use_karras_sigmas": True},
                                   {"thresholding": True, "sample_max_value": 2.5}])
def test_dpmpp_singlestep_options_equal_diffusers(extra, steps):
    config = {**SD, **extra}
    got, expected, scale = _both_loops("dpm++2s", config, steps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


def _dpmpp_2s_ancestral_reference(config, steps, prediction, start, noise, first=0, clean=None):
    """DPM++ 2S a written independently, in float64 and the form of Lu et al. 2022 (time t = -log sigma, step h,
    expm1), on diffusers' EulerDiscreteScheduler sigmas; the midpoint's timestep by diffusers' own
    log-sigma interpolation. diffusers has no DPM++ 2S a scheduler, so this is its reference."""
    karras = bool(config.get("use_karras_sigmas"))
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps)
    sigmas, timesteps = ref.sigmas.numpy().astype(np.float64), ref.timesteps.numpy().astype(np.float64)
    train_log_sigmas = np.log(((1 - ref.alphas_cumprod) / ref.alphas_cumprod).numpy() ** 0.5)

    def x0_of(x, sigma, t):  # as diffusers' Euler turns the network output into x0
        out = stand_in_eps((x / np.sqrt(sigma**2 + 1)).astype(np.float32), float(t)).astype(np.float64)
        if prediction == "epsilon":
            return x - sigma * out
        if prediction == "sample":
            return out
        return out * (-sigma / np.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)  # v_prediction

    x = start.astype(np.float64) * float(ref.init_noise_sigma)
    if clean is not None:  # img2img: the clean latents noised to the first step's sigma
        x = clean.astype(np.float64) + start.astype(np.float64) * sigmas[first]
    for i in range(first, steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = x0_of(x, sigma, timesteps[i])
        sigma_up = min(sigma_next, np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = np.sqrt(sigma_next**2 - sigma_up**2)
        if sigma_down == 0:
            x = x + (x - x0) / sigma * (sigma_down - sigma)
        else:
            t, t_next = -np.log(sigma), -np.log(sigma_down)
            h = t_next - t
            sigma_mid = np.exp(-(t + h / 2))
            t_mid = ref._sigma_to_t(np.array(sigma_mid), train_log_sigmas)
            x_mid = (sigma_mid / sigma) * x - np.expm1(-h / 2) * x0
            x = (sigma_down / sigma) * x - np.expm1(-h) * x0_of(x_mid, sigma_mid, t_mid)
        if sigma_next > 0:
            x = x + noise(x.shape) * sigma_up
    assert not karras or np.allclose(sigmas[:-1], ref.sigmas.numpy()[:-1])
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 20, 50])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name, prediction", [("dpm++2s-a", "epsilon"), ("dpm++2s-a", "v_prediction"),
                                              ("dpm++2s-a-karras", "epsilon")])
def test_dpmpp_2s_ancestral_equals_an_independent_reference(name, prediction, spacing, steps):
    config = {**SD, "timestep_spacing": spacing, "prediction_type": prediction,
              "use_karras_sigmas": name.endswith("karras")}
    start = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    gen = torch.Generator().manual_seed(1)
    expected = _dpmpp_2s_ancestral_reference(config, steps, prediction, start,
                                             lambda s: torch.randn(s, generator=gen).numpy().astype(np.float64))
    sched = resolve_scheduler(name, config)
    calls = []
    denoiser = stand_in_denoiser(sched, prediction)
    gen2 = torch.Generator().manual_seed(1)
    got = _run_sampler(sched, denoiser, start, steps, lambda s: torch.randn(s, generator=gen2).numpy(),
                       lambda i, n: calls.append((i, n)))
    assert sched.name == name and calls[-1] == (2 * steps - 1, 2 * steps - 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["dpm++2s-a", "dpm++2s-a-karras"])
def test_dpmpp_2s_ancestral_samples_the_data_distribution(name):
    """With our NumPy noise and the exact noise predictor of Gaussian data N(0, 0.5^2), DPM++ 2S a's samples
    have the data's mean and spread (to the schedule's truncation), and a second-order sampler gets closer
    to that spread than Euler a in the same number of steps."""
    data_std, config = 0.5, {**SD, "timestep_spacing": "trailing"}
    start = np.random.default_rng(0).standard_normal((8, 4, 64, 64)).astype(np.float32)

    def run(sampler, steps):
        sched = resolve_scheduler(sampler, config)
        ac = alphas_cumprod(sched)

        def exact_eps(sample: np.ndarray, t: float) -> np.ndarray:
            a = np.interp(t, np.arange(len(ac)), ac)
            return (np.sqrt(1 - a) * sample / (a * data_std**2 + 1 - a)).astype(np.float32)

        denoiser = Denoiser(unet=lambda s, t, **c: exact_eps(s, float(t[0])), guidance_scale=1.0,
                            cond={}, prediction_type="epsilon", alphas_cumprod=ac)
        rng = np.random.default_rng(2)
        return _run_sampler(sched, denoiser, start, steps, lambda s: rng.standard_normal(s, dtype=np.float32), None)

    got = run(name, 50)
    assert abs(got.mean()) < 0.01
    assert got.std() == pytest.approx(data_std, rel=0.06)
    assert abs(run(name, 20).std() - data_std) < abs(run("euler-a", 20).std() - data_std)


@pytest.mark.parametrize("steps, first", [(4, 2), (20, 6), (20, 19)])
def test_dpmpp_2s_ancestral_starts_part_way(steps, first):
    """img2img: the reference loop entered at step `first` from clean latents noised to that sigma."""
    start = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    clean = np.random.default_rng(5).uniform(-1, 1, (1, 4, 8, 8)).astype(np.float32)
    gen = torch.Generator().manual_seed(1)
    expected = _dpmpp_2s_ancestral_reference(SD, steps, "epsilon", start,
                                             lambda s: torch.randn(s, generator=gen).numpy().astype(np.float64),
                                             first, clean)
    sched = resolve_scheduler("dpm++2s-a", SD)
    denoiser = stand_in_denoiser(sched, "epsilon")
    gen2 = torch.Generator().manual_seed(1)
    got = _run_sampler(sched, denoiser, start, steps, lambda s: torch.randn(s, generator=gen2).numpy(), None,
                       start=first, x0=clean)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_third_order_loop_equals_diffusers(steps, spacing, karras):
    """DPM-Solver++ with solver_order=3 (diffusers' third-order multistep update), stand-in model."""
    config = {**SD, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 3, "timestep_spacing": spacing,
              "use_karras_sigmas": karras}
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(steps)
    start = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(start) * ref.init_noise_sigma
    for t in ref.timesteps:
        eps = torch.from_numpy(stand_in_eps(ref.scale_model_input(x, t).numpy(), float(t)))
        x = ref.step(eps, t, x).prev_sample
    sched = resolve_scheduler(config, {})
    assert sched.name == "dpm++2m-karras" if karras else sched.name == "dpm++2m"
    got = _run_sampler(sched, stand_in_denoiser(sched, "epsilon"), start, steps, None, None)
    np.testing.assert_allclose(got, x.numpy(), atol=1e-5 * np.abs(x.numpy()).max())
    if steps >= 15:  # the third-order update ran (under 15 steps the last two are order 1 and 2)
        second = resolve_scheduler({**config, "solver_order": 2}, {})
        other = _run_sampler(second, stand_in_denoiser(second, "epsilon"), start, steps, None, None)
        assert np.abs(other - got).max() > 1e-4 * np.abs(got).max()


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_guidance_boundary_counts_the_steps_that_run(name):
    """guidance_cutoff guides the first ceil(cutoff x n) of the n steps run (img2img: after the start step);
    the boundary lies between the last guided timestep and the next, and 1 guides every step."""
    from edgesd.samplers import guidance_boundary, schedule_for

    sched = resolve_scheduler(name, SD)
    timesteps = np.asarray(schedule_for(sched, 10, 0).timesteps, dtype=np.float64)
    assert guidance_boundary(sched, 10, 0, 1.0) is None
    assert guidance_boundary(sched, 10, 0, 0.3) == pytest.approx((timesteps[2] + timesteps[3]) / 2)
    assert guidance_boundary(sched, 10, 0, 0.31) == pytest.approx((timesteps[3] + timesteps[4]) / 2)
    assert guidance_boundary(sched, 10, 4, 0.5) == pytest.approx((timesteps[6] + timesteps[7]) / 2)  # 3 of 6 run
    assert guidance_boundary(sched, 10, 0, 0.01) == pytest.approx((timesteps[0] + timesteps[1]) / 2)  # at least one
