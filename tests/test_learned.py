"""The fitted linear solver (diffx.samplers.learned): exact tracing of the classical samplers, a fit that lowers
the held-out error, safe solver files, and ``diffx calibrate`` -> ``diffx sample sampler=learned``."""

import math

import pytest
import torch
from analytic import AnalyticModel, gaussian, two_point_mixture
from conftest import make_objective

from diffx import grids, samplers
from diffx.samplers import learned
from diffx.errors import DiffxError

DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp", "dpmpp_3m", "unipc", "ipndm"]


def _denoiser(objective, posterior=gaussian, **data):
    return samplers.make_denoiser(AnalyticModel(objective, posterior, **data).double(), objective)


@pytest.mark.parametrize("family,schedule", [("ddpm", "linear"), ("ddpm", "cosine"), ("flow", "linear")])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_trace_reproduces_every_deterministic_sampler(name, family, schedule):
    """C read off by running the sampler on basis vectors is the sampler: same output on a non-linear
    model, to float64 round-off, and as many model calls."""
    obj = make_objective(family, schedule)
    sampler, ts = getattr(samplers, name), grids.uniform(7, obj.schedule)
    solver = learned.trace(sampler, obj.schedule, ts)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d1, d2 = _denoiser(obj, two_point_mixture), _denoiser(obj, two_point_mixture)
    expect, got = sampler(d1, obj.schedule, z.clone(), ts), solver(d2, obj.schedule, z.clone())
    assert d1.nfe == d2.nfe == solver.steps
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-9)
    assert bool((solver.C.triu(1) == 0).all())


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_sde"])
def test_trace_refuses_a_stochastic_sampler(name):
    obj = make_objective("ddpm", "cosine")
    with pytest.raises(DiffxError, match="stochastic"):
        learned.trace(getattr(samplers, name), obj.schedule, grids.uniform(5, obj.schedule))


def test_denoiser_takes_a_tensor_time_and_passes_its_gradient():
    obj = make_objective("flow", "linear")
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    x0, _ = _denoiser(obj)(x, t)
    x0.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad) and t.grad != 0
    torch.testing.assert_close(x0.detach(), _denoiser(obj)(x, 0.4)[0])


def _pool(n, seed, dim=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("family,schedule", [("flow", "linear"), ("ddpm", "cosine")])
def test_fit_lowers_the_held_out_error_and_keeps_the_times_ordered(family, schedule):
    """On a mixture (a curved ODE), 4-step UniPC fitted on one noise pool is more accurate on another,
    against the model's own reference solve, and its times stay a decreasing grid inside (0, 1]."""
    obj = make_objective(family, schedule)
    den = _denoiser(obj, two_point_mixture, m=0.6, c=0.1)
    base = learned.trace(samplers.unipc, obj.schedule, grids.uniform(4, obj.schedule))

    def denoiser_for(idx):
        return den

    fit_z, held_z = _pool(512, 1), _pool(512, 2)
    fit_ref, held_ref = (learned.reference(den, obj.schedule, z, steps=100) for z in (fit_z, held_z))
    fitted = learned.fit(denoiser_for, base, fit_z, fit_ref, iters=150, lr=3e-3, batch=256)
    before, after = (learned.rms(denoiser_for, s, held_z, held_ref) for s in (base, fitted))
    assert after < 0.7 * before, (before, after)
    assert fitted.ts[0] == base.ts[0] and bool((fitted.ts[1:] < fitted.ts[:-1]).all()) and fitted.ts[-1] > 0
    assert not torch.equal(fitted.ts, base.ts)


@pytest.mark.parametrize("freeze,frozen", [(0.5, 3), (0.25, 2)])
def test_a_frozen_fit_keeps_the_first_calls_points_and_times_and_fits_the_rest(freeze, frozen):
    """freeze=0.5 of 6 calls: the first 3 query points (rows of C) and times stay the base's; the later
    rows, the output and the later times move, stay ordered below the last frozen time, and lower the loss."""
    obj = make_objective("flow", "linear")
    den = _denoiser(obj, two_point_mixture, m=0.6, c=0.1)
    base = learned.trace(samplers.unipc, obj.schedule, grids.uniform(6, obj.schedule))
    z = _pool(512, 1)
    ref = learned.reference(den, obj.schedule, z, steps=100)
    fitted = learned.fit(lambda idx: den, base, z, ref, iters=100, lr=3e-3, batch=256, freeze=freeze)
    assert torch.equal(fitted.C[:frozen], base.C[:frozen]) and torch.equal(fitted.ts[:frozen], base.ts[:frozen])
    assert not torch.equal(fitted.C[frozen:], base.C[frozen:]) and not torch.equal(fitted.ts[frozen:], base.ts[frozen:])
    assert bool((fitted.ts[1:] < fitted.ts[:-1]).all()) and fitted.ts[-1] > 0
    assert learned.rms(lambda idx: den, fitted, z, ref) < learned.rms(lambda idx: den, base, z, ref)
    with pytest.raises(DiffxError, match=r"freeze=1: expected a share of the calls in \[0, 1\)"):
        learned.fit(lambda idx: den, base, z, ref, iters=1, freeze=1)


def test_reference_matches_the_closed_form_ode_endpoint():
    """Gaussian data: the PF-ODE keeps (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed, so from pure
    noise z at t = 1 (flow: alpha = 0) it ends at mu + s z."""
    obj = make_objective("flow", "linear")
    z = _pool(64, 3)
    got = learned.reference(_denoiser(obj, gaussian, mu=0.5, s=0.3), obj.schedule, z, steps=100)
    assert (got - (0.5 + 0.3 * z)).abs().max() < 1e-4


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_reference_reaches_the_ode_endpoint_below_the_smallest_trained_noise(schedule):
    """Narrow Gaussian data (s = 0.02) on DDPM, whose smallest trained noise level is sigma/alpha ~ 0.01: the
    reference is the ODE endpoint at t = 0 (closed form, GaussianModel.ode_solution), not x0_hat at that level,
    which misses it by ~4e-3 here (the floor the reference used to have)."""
    from analytic import GaussianModel

    obj = make_objective("ddpm", schedule)
    model = GaussianModel(obj, mu=0.5, s=0.02).double()
    z = _pool(64, 4)
    got = learned.reference(samplers.make_denoiser(model, obj), obj.schedule, z, steps=200)
    expect = model.ode_solution(z)
    t_min = torch.tensor([obj.schedule.t_min], dtype=torch.float64)
    stop_early = model.posterior_at(model.ode_solution(z, t_end=float(t_min)), t_min)[0]
    assert (stop_early - expect).abs().max() > 1e-3  # the old floor is visible at this tolerance
    assert (got - expect).abs().max() < 1e-5


def test_reference_matches_a_dop853_solve_on_a_mixture():
    """Two-point mixture on DDPM-linear: the reference against scipy's DOP853 (rtol 1e-10) on the
    probability-flow ODE in the VP angle phi = atan(sigma / alpha), integrated to phi = 1e-9 (as in
    scripts/bench_samplers.py)."""
    from scipy.integrate import solve_ivp
    from analytic import two_point_mixture

    obj = make_objective("ddpm", "linear")
    z = _pool(32, 5, dim=3)
    got = learned.reference(_denoiser(obj, two_point_mixture, c=0.05), obj.schedule, z, steps=200)
    (a1, s1), = obj.schedule.table(torch.ones(1))

    def f(phi, y):  # dx/dphi = -sin(phi) x0_hat + cos(phi) noise_hat on the VP path alpha = cos, sigma = sin
        x0, noise = two_point_mixture(torch.from_numpy(y), math.cos(phi), math.sin(phi), c=0.05)
        return (-math.sin(phi) * x0 + math.cos(phi) * noise).numpy()

    sol = solve_ivp(f, (math.atan2(s1, a1), 1e-9), (z / math.hypot(a1, s1)).numpy().ravel(), method="DOP853",
                    rtol=1e-10, atol=1e-12)
    err = got - torch.from_numpy(sol.y[:, -1]).view(z.shape)
    assert err.pow(2).mean().sqrt() < 1e-4 and err.abs().max() < 1e-3  # stopping at sigma_min: 8.8e-4 / 2.5e-3


def test_save_and_load_round_trip(tmp_path):
    obj = make_objective("ddpm", "linear")
    solver = learned.trace(samplers.dpmpp_3m, obj.schedule, grids.logsnr(6, obj.schedule))
    solver.meta = {"base": "dpmpp_3m", "cfg": 3.0}
    learned.save(tmp_path / "s.safetensors", solver)
    back = learned.load(tmp_path / "s.safetensors")
    assert torch.equal(back.ts, solver.ts) and torch.equal(back.C, solver.C) and back.meta == solver.meta


def _write(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case", ["missing", "garbage", "format", "upper", "times", "shape", "nan"])
def test_bad_solver_files_fail_in_one_line(case, tmp_path):
    n, good = 3, {"format": learned.FORMAT, "meta": "{}"}
    ts, C = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64), torch.tril(torch.ones(n + 1, n + 1, dtype=torch.float64))
    path = tmp_path / "s.safetensors"
    if case == "garbage":
        path.write_bytes(b"\x00" * 7 + b"import os; os.system('touch pwned')")
    elif case != "missing":
        tensors, meta = {"ts": ts, "C": C}, dict(good)
        if case == "format":
            meta["format"] = "diffx.checkpoint"
        if case == "upper":
            tensors["C"] = C + torch.eye(n + 1, dtype=torch.float64).roll(1, 1)
        if case == "times":
            tensors["ts"] = torch.tensor([2.0, 0.6, 0.3], dtype=torch.float64)
        if case == "shape":
            tensors["C"] = C[:, :n].contiguous()
        if case == "nan":
            tensors["C"] = C * math.nan
        _write(path, tensors, meta)
    with pytest.raises(DiffxError, match="sampler.path=") as e:
        learned.load(path)
    assert "\n" not in str(e.value) and not (tmp_path / "pwned").exists()


def _fit_problem(kind: str, c: float):
    """A two-point mixture (linear schedule) with its exact denoiser, UniPC's 4-step solver as the base,
    and 128 fit and 128 validation noises with their reference endpoints: (den, base, z, ref, val)."""
    obj = make_objective(kind, "linear")
    den = _denoiser(obj, two_point_mixture, m=0.6, c=c)
    base = learned.trace(samplers.unipc, obj.schedule, grids.uniform(4, obj.schedule))
    fit_z, val_z = _pool(128, 1), _pool(128, 2)
    fit_ref, val_ref = (learned.reference(den, obj.schedule, z, steps=50) for z in (fit_z, val_z))
    return den, base, fit_z, fit_ref, (lambda idx: den, val_z, val_ref)


def test_a_fit_with_validation_returns_its_best_checked_solver(monkeypatch):
    """Early stopping: every check scores the current solver on the validation noises, and the result is the
    one with the lowest RMS of those that also beat the base's mean per-sample error (the guard's rule), or
    the base. At a high rate the last iterate is worse than the best one."""
    den, base, fit_z, fit_ref, val = _fit_problem("ddpm", c=0.05)
    scored, errors = [], learned.sample_errors
    monkeypatch.setattr(learned, "sample_errors", lambda *a, **k: scored.append(errors(*a, **k)) or scored[-1])
    options = dict(iters=40, lr=1e-1, t_lr=3e-1, batch=32, check_every=4)
    got = learned.fit(lambda idx: den, base, fit_z, fit_ref, val=val, **options)
    last = learned.fit(lambda idx: den, base, fit_z, fit_ref, **options)  # the same run, no validation
    assert len(scored) == 1 + 10  # the base, then one per check
    rms, mean = [se.mean().sqrt().item() for se in scored], [se.sqrt().mean().item() for se in scored]
    eligible = [r for r, m in zip(rms[1:], mean[1:]) if m < mean[0]]
    assert eligible and learned.rms(*val[:1], got, *val[1:]) == pytest.approx(min(eligible))
    assert learned.rms(*val[:1], last, *val[1:]) > min(eligible)


def test_early_stopping_skips_a_check_that_wins_the_rms_but_loses_the_mean(monkeypatch):
    """A checked solver with a lower RMS but a worse mean per-sample error than the base is not kept; one
    better on both is. (Per-sample squared errors: base [0.01, 3.99], RMS 1.41 / mean 1.05; ``rms_only``
    [0.25, 3.0], 1.27 / 1.12; ``both`` [0.0025, 3.6], 1.34 / 0.97.)"""
    den, base, fit_z, fit_ref, val = _fit_problem("ddpm", c=0.05)
    per_sample = {"base": [0.01, 3.99], "rms_only": [0.25, 3.0], "both": [0.0025, 3.6]}
    for check, expect_base in (("rms_only", True), ("both", False)):
        fake = iter([torch.tensor(per_sample["base"]), torch.tensor(per_sample[check])])
        monkeypatch.setattr(learned, "sample_errors", lambda *a, **k: next(fake))
        got = learned.fit(lambda idx: den, base, fit_z, fit_ref, val=val, iters=1, batch=32, check_every=1)
        assert (got is base) == expect_base


def test_a_fit_that_goes_astray_falls_back_to_its_base():
    """With validation noises, fit keeps its result only if it beats the solver it started from there:
    a fit to the right endpoints is kept, a fit pulled towards wrong ones (here reflected about 1) is
    replaced by the base itself."""
    den, base, fit_z, fit_ref, val = _fit_problem("flow", c=0.1)
    base_err = learned.rms(*val[:1], base, *val[1:])
    good = learned.fit(lambda idx: den, base, fit_z, fit_ref, iters=30, lr=3e-3, batch=64, val=val)
    assert good is not base and learned.rms(*val[:1], good, *val[1:]) < base_err
    astray = learned.fit(lambda idx: den, base, fit_z, 2.0 - fit_ref, iters=60, lr=3e-2, batch=64, val=val)
    assert astray is base
