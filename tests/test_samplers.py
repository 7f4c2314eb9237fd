"""Samplers and grids on data with an exact denoiser: right distribution, right ODE endpoint, NFE, CFG."""

import math

import pytest
import torch

from analytic import GaussianModel
from conftest import make_objective
from diffx import grids, samplers
from diffx.errors import DiffxError
from diffx.samplers import plan

SCHEDULES = [(f, s) for f in ("ddpm", "flow") for s in ("linear", "cosine")]
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp", "dpmpp_3m", "unipc", "ipndm"]
STOCHASTIC = ["ddpm", "dpmpp_sde"]
# Steps that bring each sampler's discretisation error under the tolerances below on this data
# (narrow data, s = 0.3, on the uniform grid is a hard case: first-order error at 50 steps is ~0.1).
STEPS = {"ddim": 250, "euler": 250, "ddpm": 1000, "heun": 80, "dpmpp": 80, "dpmpp_3m": 60, "unipc": 60,
         "ipndm": 80, "dpmpp_sde": 250}
GRIDS = {"uniform": grids.uniform, "karras": grids.karras, "logsnr": grids.logsnr,
         "shift": lambda n, s: grids.uniform(n, s, shift=3.0)}


def run(sampler, family, schedule, steps, n=4000, seed=0, grid=grids.uniform, **kw):
    obj = make_objective(family, schedule)
    model = GaussianModel(obj)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    denoise = samplers.make_denoiser(model, obj)
    out = getattr(samplers, sampler)(denoise, obj.schedule, z.clone(), grid(steps, obj.schedule), generator=g, **kw)
    return out, z, model, denoise


@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", DETERMINISTIC + STOCHASTIC)
def test_reaches_the_data_distribution(sampler, family, schedule):
    out, _, model, _ = run(sampler, family, schedule, STEPS[sampler])
    assert abs(out.mean().item() - model.mu) < 0.02
    assert out.std().item() == pytest.approx(model.s, rel=0.04)


@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_follow_the_ode(sampler, family, schedule):
    out, z, model, _ = run(sampler, family, schedule, STEPS[sampler], n=256)
    err = (out - model.ode_endpoint(z)).abs().max().item()
    assert err < 2.5e-2, err


@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("grid", ["karras", "logsnr"])
def test_grids_ending_at_sigma_min_have_no_coarse_final_jump(grid, family, schedule):
    """30 steps of a 3rd-order sampler land on the ODE endpoint: the last step starts at sigma_min."""
    out, z, model, _ = run("unipc", family, schedule, 30, n=256, grid=GRIDS[grid], order=3)
    assert (out - model.ode_endpoint(z)).abs().max().item() < 1e-2


def test_uniform_grid_final_jump_is_coarse_for_ddpm():
    """Why karras / logsnr exist: on DDPM's linear schedule, uniform t leaves a jump from sigma ~ 0.1 to 0."""
    errs = [(out - model.ode_endpoint(z)).abs().max().item()
            for out, z, model, _ in [run("unipc", "ddpm", "linear", 30, n=256, grid=g, order=3)
                                     for g in (grids.uniform, grids.logsnr)]]
    assert errs[0] > 10 * errs[1]


@pytest.mark.parametrize("family,schedule", SCHEDULES)
def test_ddim_with_eta_reaches_the_data_distribution(family, schedule):
    out, _, model, _ = run("ddim", family, schedule, 250, eta=0.5)
    assert abs(out.mean().item() - model.mu) < 0.02
    assert out.std().item() == pytest.approx(model.s, rel=0.05)


@pytest.mark.parametrize("family,schedule", SCHEDULES)
def test_first_order_dpmpp_step_equals_ddim_step(family, schedule):
    obj = make_objective(family, schedule)
    model = GaussianModel(obj, mu=0.1, s=0.7)
    x = torch.randn(16, 1, 3, 3, dtype=torch.float64)
    ts = torch.tensor([0.8, 0.55], dtype=torch.float64)  # one step, which DPM-Solver++ takes at first order
    for name in ["dpmpp", "dpmpp_3m", "unipc", "ipndm", "euler"]:
        a = getattr(samplers, name)(samplers.make_denoiser(model, obj), obj.schedule, x.clone(), ts)
        b = samplers.ddim(samplers.make_denoiser(model, obj), obj.schedule, x.clone(), ts)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family,schedule", SCHEDULES)
def test_sde_without_noise_is_the_ode(family, schedule):
    out_sde, *_ = run("dpmpp_sde", family, schedule, 12, n=32, eta=0.0)
    out_ode, *_ = run("dpmpp", family, schedule, 12, n=32)
    torch.testing.assert_close(out_sde, out_ode, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler,nfe", [(s, 10) for s in DETERMINISTIC + STOCHASTIC if s != "heun"] + [("heun", 19)])
def test_nfe_is_counted(sampler, nfe):
    _, _, _, denoise = run(sampler, "ddpm", "cosine", 10, n=4)
    assert denoise.nfe == nfe


@pytest.mark.parametrize("sampler", DETERMINISTIC[:-1])  # ipndm extrapolates noise_hat to sigma = 0 instead
def test_last_step_lands_on_clean_data(sampler):
    """The final step goes to t = 0 and returns x0_hat at the last grid point exactly."""
    obj = make_objective("ddpm", "linear")
    model = GaussianModel(obj)
    x = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    ts = torch.tensor([0.3, 0.0], dtype=torch.float64)
    out = getattr(samplers, sampler)(samplers.make_denoiser(model, obj), obj.schedule, x.clone(), ts)
    torch.testing.assert_close(out, model.posterior_at(x, torch.full((8,), 0.3, dtype=torch.float64))[0])


# ---------------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_grids_run_from_pure_noise_to_data(grid, family, schedule, steps):
    ts = GRIDS[grid](steps, make_objective(family, schedule).schedule)
    assert ts.dtype == torch.float64 and ts.shape == (steps + 1,)
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])


@pytest.mark.parametrize("family,schedule", SCHEDULES)
def test_karras_and_logsnr_spacing(family, schedule):
    """Karras: s^(1/rho) equally spaced; log-SNR: lambda equally spaced; both end at sigma_min, then 0."""
    sched = make_objective(family, schedule).schedule
    for grid, warp in [(grids.karras, lambda s: s ** (1 / 7)), (grids.logsnr, torch.log)]:
        ts = grid(12, sched, sigma_min=0.02, sigma_max=50.0)
        alpha, sigma = sched.alpha_sigma(ts[1:-1])
        w = warp(sigma / alpha)
        steps = w[1:] - w[:-1]
        torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-6, atol=0)
        assert (sigma / alpha)[-1].item() == pytest.approx(0.02, rel=1e-6)


def test_default_sigma_min_is_the_first_trained_step():
    sched = make_objective("ddpm", "linear").schedule  # DDPM never trains t = 0: stop at its step 1
    assert grids.logsnr(10, sched)[-2].item() == pytest.approx(1 / 1000, rel=1e-6)
    sched = make_objective("flow", "linear").schedule
    ts = grids.karras(10, sched)
    assert (ts[-2] / (1 - ts[-2])).item() == pytest.approx(grids.SIGMA_MIN, rel=1e-6)


def test_shift_spends_steps_at_high_noise():
    plain, shifted = grids.uniform(10), grids.uniform(10, shift=3.0)
    assert torch.all(shifted[1:-1] > plain[1:-1])
    assert shifted[5].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


# ------------------------------------------------------------------------------------------------ CFG
class _LabelModel(torch.nn.Module):
    """pred = x * (label + 2); label -1 (null) gives pred = x: CFG's effect is checkable in closed form."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        return x * (cond["label"].to(x.dtype) + 2).view(-1, 1, 1, 1)


def test_cfg_is_one_batched_forward_and_extrapolates():
    obj = make_objective("flow", "linear")
    model = _LabelModel()
    x = torch.randn(4, 1, 2, 2)
    t = torch.full((4,), 0.5)
    cond = {"label": torch.tensor([0, 1, 2, 3])}
    w = 3.0
    x0, noise = samplers.make_denoiser(model, obj, cond, cfg_scale=w)(x, 0.5)
    assert model.calls == 1
    pred_c, pred_u = model(x, t, cond), x
    expect = obj.to_x0_noise(pred_u + w * (pred_c - pred_u), x, t)
    torch.testing.assert_close(x0, expect[0])
    torch.testing.assert_close(noise, expect[1])


def test_multistep_weights_integrate_polynomials_exactly():
    """The phi-integral weights reproduce int_0^1 H e^(-H (1 - r)) r^k dr for k < nodes (3+ nodes)."""
    from diffx.samplers.multistep import weights

    for H in (0.05, 0.7, 3.0):
        v = [0.0, -0.8, -1.9, 1.0]
        for k in range(4):
            exact = _quad(lambda r: H * math.exp(-H * (1 - r)) * r**k)
            assert sum(w * vj**k for w, vj in zip(weights(H, v), v)) == pytest.approx(exact, rel=1e-9, abs=1e-12)


def _quad(f, n=2000):
    """Composite Simpson on [0, 1]."""
    h = 1 / n
    return h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * f(i * h) for i in range(n + 1))


class _SlightlyWrongEps(torch.nn.Module):
    """The exact eps of Gaussian data plus a 1e-3 error: what any trained eps-model looks like."""

    def __init__(self, objective):
        super().__init__()
        self.exact = GaussianModel(objective, mu=0.0, s=0.3)

    def forward(self, xt, t, cond=None):
        return self.exact(xt, t) + 1e-3


def test_x0_clipping_tames_an_eps_model_at_the_cosine_schedules_noisy_end():
    """alpha(1) ~ 5e-5 on the cosine DDPM schedule: x0_hat = (x - sigma eps) / alpha turns a 1e-3 eps error
    into ~20 at the first step; clipping x0_hat to the data range (as DDPM's clip_sample) keeps the sampler on track."""
    obj = make_objective("ddpm", "cosine")
    model = _SlightlyWrongEps(obj)
    z = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = grids.uniform(10)
    target = model.exact.ode_endpoint(z)
    raw = samplers.dpmpp(samplers.make_denoiser(model, obj), obj.schedule, z.clone(), ts)
    clipped = samplers.dpmpp(samplers.make_denoiser(model, obj, x0_range=(-1.0, 1.0)), obj.schedule, z.clone(), ts)
    assert (raw - target).abs().max() > 0.5
    assert (clipped - target).abs().max() < 0.25 and (clipped - target).abs().mean() < 0.06


# ------------------------------------------------------------------------------- Heun and the guard
HEUN_GRIDS = {"uniform": grids.uniform, "karras": grids.karras, "logsnr": grids.logsnr}


@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("grid", list(HEUN_GRIDS))
def test_heun_stays_finite_and_improves_at_3_to_10_nfe(grid, family, schedule):
    """Issue #16: Heun's trapezoid in s diverged from pure noise (RMS 39 - 2300 at 5 NFE on the cosine DDPM
    schedule). On a two-mode mixture every budget of 3-10 calls stays bounded and 10 beats 3."""
    from analytic import AnalyticModel, two_point_mixture

    obj = make_objective(family, schedule)
    model = AnalyticModel(obj, two_point_mixture)
    z = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = samplers.unipc(samplers.make_denoiser(model, obj), obj.schedule, z.clone(), grids.logsnr(200, obj.schedule),
                         order=3)
    errs = {}
    for nfe in range(3, 11):
        steps = plan.steps_for_nfe(samplers.heun, nfe, HEUN_GRIDS[grid], obj.schedule)
        denoise = samplers.make_denoiser(model, obj)
        out = samplers.heun(denoise, obj.schedule, z.clone(), HEUN_GRIDS[grid](steps, obj.schedule))
        assert torch.isfinite(out).all() and denoise.nfe <= nfe
        errs[nfe] = (out - ref).pow(2).mean().sqrt().item()
    assert max(errs.values()) < 1.0, errs  # modes 1.2 apart; the trapezoid in s gave up to 1e4 here
    assert errs[10] < errs[3], errs


@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("grid", list(HEUN_GRIDS))
def test_heun_converges_at_second_order_on_every_grid(grid, family, schedule):
    """Gaussian data, exact ODE endpoint at the grid's last noise level then the same final x0_hat step
    (as tests/test_sampler_order.py): doubling the steps divides the error by ~4, also where the first
    steps take the exponential trapezoid (every grid's step out of pure noise)."""
    obj = make_objective(family, schedule)
    model = GaussianModel(obj, mu=0.5, s=0.3)
    z = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(steps):
        ts = HEUN_GRIDS[grid](steps, obj.schedule)
        out = samplers.heun(samplers.make_denoiser(model, obj), obj.schedule, z.clone(), ts)
        t_last = ts[-2].item()
        exact = model.posterior_at(model.ode_solution(z, 1.0, t_last), torch.full((64,), t_last, dtype=torch.float64))[0]
        return (out - exact).abs().max().item()

    rate = math.log2(error(32) / error(64))  # DDPM's uniform grid is asymptotic from ~32 steps
    assert rate > 1.65, rate


@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_heun_spends_2_calls_a_step_but_the_last_in_every_family(family):
    """The step out of pure noise is corrected too (flow: alpha(1) = 0), so the count no longer depends on the family."""
    _, _, _, denoise = run("heun", family, "linear", 10, n=4)
    assert denoise.nfe == 19 and plan.steps_for_nfe(samplers.heun, 19) == 10 and plan.steps_for_nfe(samplers.heun, 20) == 10


class _Exploding(torch.nn.Module):
    """x0_hat = 10 x below t = 0.5 (so the state grows tenfold a step), or NaN with ``nan``."""

    def __init__(self, objective, nan=False):
        super().__init__()
        self.objective, self.nan = objective, nan

    def forward(self, x, t, cond=None):
        late = (t < 0.5).view(-1, *[1] * (x.ndim - 1))
        x0 = torch.where(late, torch.full_like(x, math.nan) if self.nan else 10 * x, torch.zeros_like(x))
        alpha, sigma = (v.view(-1, *[1] * (x.ndim - 1)) for v in self.objective.schedule.alpha_sigma(t))
        return self.objective.target(x0, (x - alpha * x0) / sigma, t)


@pytest.mark.parametrize("nan", [False, True], ids=["exploding", "nan"])
@pytest.mark.parametrize("sampler", DETERMINISTIC + STOCHASTIC)
def test_the_guard_stops_a_diverging_sampler_with_one_line(sampler, nan):
    obj = make_objective("flow", "linear")
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = plan.make(getattr(samplers, sampler), grids.karras, 8, obj.schedule)
    with pytest.raises(DiffxError) as e:
        p(samplers.make_denoiser(_Exploding(obj, nan), obj), obj.schedule, z.clone(),
          generator=torch.Generator().manual_seed(0))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"sampler={sampler} grid=karras diverged at step " in msg
    assert ("not finite" if nan else "RMS exceeds") in msg
    step = int(msg.split("step ")[1].split("/")[0])
    assert 2 <= step <= 8  # the first step is at t = 1, where the model is still tame


def test_the_guard_passes_a_healthy_run_unchanged():
    out, z, model, denoise = run("dpmpp", "ddpm", "cosine", 10, n=8)
    obj = make_objective("ddpm", "cosine")
    raw = samplers.multistep.multistep(samplers.make_denoiser(model, obj), obj.schedule, z.clone(), grids.uniform(10))
    torch.testing.assert_close(out, raw, rtol=0, atol=0)
