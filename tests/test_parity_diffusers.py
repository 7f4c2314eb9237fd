"""diffx's samplers equal diffusers' schedulers on the same analytic model, to float32 round-off.

The model is a function of ``(x_t, alpha, sigma)`` (tests/analytic.py): diffx evaluates it at its
schedule's (alpha, sigma) at t; diffusers at the (alpha, sigma) its scheduler uses at that call, computed
with the scheduler's own float32 arithmetic, so that both sides run the same function and only the
float32 tables of diffusers differ. DDPM's knot (i + 1) / N is diffusers' timestep i, so diffx's
uniform grid is diffusers' "trailing" spacing.
"""

import diffusers
import pytest
import torch

from analytic import AnalyticModel, two_point_mixture
from conftest import make_objective
from diffx import grids, samplers

BETA_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
DDPM_CASES = [(s, p, n) for s in BETA_SCHEDULE for p in PREDICTION for n in (10, 25)]
# overlapping modes: a well-conditioned ODE, so that round-off is not amplified by a mode decision
DATA = dict(m=0.5, c=0.5)


def _output(prediction, xt, alpha, sigma):
    """What a perfect network of this parameterisation returns at (xt, alpha, sigma)."""
    x0, noise = two_point_mixture(xt, alpha, sigma, **DATA)
    return {"eps": noise, "v": alpha * noise - sigma * x0, "flow": noise - x0}[prediction]


def _ddim_alpha_sigma(sched, i, tau):
    abar = sched.alphas_cumprod[int(tau)]
    return float(abar**0.5), float((1 - abar) ** 0.5)


def _ve_alpha_sigma(sched, i, tau):  # Euler: x_in = x / sqrt(sigma^2 + 1), as scale_model_input computes it
    root = (sched.sigmas[i] ** 2 + 1) ** 0.5
    return float(1 / root.double()), float(sched.sigmas[i].double() / root.double())


def _dpm_alpha_sigma(sched, i, tau):
    return tuple(float(v) for v in sched._sigma_to_alpha_sigma_t(sched.sigmas[i]))


def _flow_alpha_sigma(sched, i, tau):
    return float(1 - sched.sigmas[i]), float(sched.sigmas[i])


def _run_diffusers(sched, prediction, alpha_sigma, z):
    x = z * float(getattr(sched, "init_noise_sigma", 1.0))
    for i, tau in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, tau) if hasattr(sched, "scale_model_input") else x
        x = sched.step(_output(prediction, x_in, *alpha_sigma(sched, i, tau)), tau, x).prev_sample
    return x


def _run_diffx(sampler, family, schedule, prediction, ts, z):
    obj = make_objective(family, schedule, **({"prediction": prediction} if family == "ddpm" else {}))
    denoise = samplers.make_denoiser(AnalyticModel(obj, two_point_mixture, **DATA), obj)
    return getattr(samplers, sampler)(denoise, obj.schedule, z.clone(), ts)


def _ddpm_parity(sampler, cls, alpha_sigma, schedule, prediction, steps, atol=None, **kw):
    sched = cls(num_train_timesteps=1000, beta_schedule=BETA_SCHEDULE[schedule],
                prediction_type=PREDICTION[prediction], timestep_spacing="trailing", **kw)
    sched.set_timesteps(steps)
    ts = grids.uniform(steps)
    torch.testing.assert_close((sched.timesteps.double() + 1) / 1000, ts[:-1])  # the same grid
    z = torch.randn(64, 1, 3, 3, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    expect = _run_diffusers(sched, prediction, alpha_sigma, z)
    got = _run_diffx(sampler, "ddpm", schedule, prediction, ts, z)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=atol(sched) if atol else 1e-5)


@pytest.mark.parametrize("schedule,prediction,steps", DDPM_CASES)
def test_ddim_equals_DDIMScheduler(schedule, prediction, steps):
    _ddpm_parity("ddim", diffusers.DDIMScheduler, _ddim_alpha_sigma, schedule, prediction, steps,
                 set_alpha_to_one=True, clip_sample=False)


def _float32_ve_state(sched):
    """EulerDiscreteScheduler steps in float32 on x / alpha, which starts sigma_max ~ 157 (linear) or 2e4
    (cosine) times larger than x: its round-off is float32's times that."""
    return 1e-5 + 4 * torch.finfo(torch.float32).eps * float(sched.sigmas.max())


@pytest.mark.parametrize("schedule,prediction,steps", DDPM_CASES)
def test_euler_equals_EulerDiscreteScheduler(schedule, prediction, steps):
    _ddpm_parity("euler", diffusers.EulerDiscreteScheduler, _ve_alpha_sigma, schedule, prediction, steps,
                 atol=_float32_ve_state)


@pytest.mark.parametrize("schedule,prediction,steps", DDPM_CASES)
def test_dpmpp_equals_DPMSolverMultistepScheduler(schedule, prediction, steps):
    _ddpm_parity("dpmpp", diffusers.DPMSolverMultistepScheduler, _dpm_alpha_sigma, schedule, prediction, steps,
                 algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")


@pytest.mark.parametrize("schedule,prediction,steps", DDPM_CASES)
def test_unipc_equals_UniPCMultistepScheduler(schedule, prediction, steps):
    _ddpm_parity("unipc", diffusers.UniPCMultistepScheduler, _dpm_alpha_sigma, schedule, prediction, steps,
                 solver_type="bh2", solver_order=2)


@pytest.mark.parametrize("steps,shift", [(10, 1.0), (28, 3.0)])
def test_flow_euler_equals_FlowMatchEulerDiscreteScheduler(steps, shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    ts = sched.sigmas.double()  # its grid: shifted linspace(1, 1/N) in t, then 0
    z = torch.randn(64, 1, 3, 3, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    expect = _run_diffusers(sched, "flow", _flow_alpha_sigma, z)
    torch.testing.assert_close(_run_diffx("euler", "flow", "linear", None, ts, z), expect, rtol=1e-5, atol=1e-5)
