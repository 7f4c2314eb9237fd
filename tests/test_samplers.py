"""Samplers on Gaussian data with an exact denoiser: right distribution, right ODE endpoint, CFG."""

import pytest
import torch

from analytic import GaussianModel
from conftest import make_objective
from diffx import grids, samplers

SCHEDULES = [(f, s) for f in ("ddpm", "flow") for s in ("linear", "cosine")]
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp"]
# Steps that bring each sampler's discretisation error under the tolerances below on this data
# (narrow data, s = 0.3, is a hard case: first-order error at 50 steps is ~0.1).
STEPS = {"ddim": 250, "euler": 250, "ddpm": 1000, "heun": 80, "dpmpp": 80}


def run(sampler, family, schedule, steps, n=4000, seed=0, **kw):
    obj = make_objective(family, schedule, **({"prediction": "v"} if family == "ddpm" and kw.pop("v", False) else {}))
    model = GaussianModel(obj)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    denoise = samplers.make_denoiser(model, obj)
    ts = grids.uniform(steps)
    out = getattr(samplers, sampler)(denoise, obj.schedule, z.clone(), ts, generator=g, **kw)
    return out, z, model, denoise


@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", DETERMINISTIC + ["ddpm"])
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
    a = samplers.dpmpp(samplers.make_denoiser(model, obj), obj.schedule, x.clone(), ts)
    b = samplers.ddim(samplers.make_denoiser(model, obj), obj.schedule, x.clone(), ts)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler,nfe", [("ddim", 10), ("euler", 10), ("dpmpp", 10), ("heun", 19), ("ddpm", 10)])
def test_nfe_is_counted(sampler, nfe):
    _, _, _, denoise = run(sampler, "ddpm", "cosine", 10, n=4)
    assert denoise.nfe == nfe


def test_last_step_lands_on_clean_data():
    """The final step goes to t = 0 and returns x0_hat exactly, without a coarse jump."""
    obj = make_objective("ddpm", "linear")
    model = GaussianModel(obj)
    x = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    ts = torch.tensor([0.3, 0.0], dtype=torch.float64)
    for name in DETERMINISTIC:
        out = getattr(samplers, name)(samplers.make_denoiser(model, obj), obj.schedule, x.clone(), ts)
        torch.testing.assert_close(out, model.posterior(x, torch.full((8,), 0.3, dtype=torch.float64))[0])


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
