"""Schedules: closed forms against diffusers' tables and derivatives against autograd."""

import math

import pytest
import torch

from diffx import schedules

ALL = [(f, n) for f in ("ddpm", "flow") for n in ("linear", "cosine")]


def make(family, name):
    return getattr(schedules, name)(family)


@pytest.mark.parametrize("family,name", ALL)
def test_derivatives_match_autograd(family, name):
    s = make(family, name)
    # off the DiscreteVP knots (k/1000), where the interpolant is differentiable
    t = (torch.linspace(0.0123, 0.9871, 37, dtype=torch.float64) + 0.00037).requires_grad_(True)
    alpha, sigma = s.alpha_sigma(t)
    da_auto, = torch.autograd.grad(alpha.sum(), t, retain_graph=True)
    ds_auto, = torch.autograd.grad(sigma.sum(), t)
    da, ds = s.d_alpha_sigma(t.detach())
    torch.testing.assert_close(da, da_auto, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ds, ds_auto, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family,name", ALL)
def test_end_points_and_monotone_snr(family, name):
    s = make(family, name)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    assert alpha[0] == pytest.approx(1.0) and sigma[0] == pytest.approx(0.0, abs=1e-12)
    lam = s.lambda_(t[1:-1])
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must fall with t"
    if family == "ddpm":
        assert torch.all(alpha > 0), "DDPM schedules keep alpha > 0, t = 1 included"
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    else:
        assert sigma[-1] == pytest.approx(1.0) and alpha[-1] == pytest.approx(0.0, abs=1e-12)


def test_ddpm_tables_match_diffusers_definitions():
    """Knot (i+1)/N is diffusers' timestep i: same alpha_bar as its linear / squaredcos_cap_v2 tables."""
    n = 1000
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    alpha, _ = make("ddpm", "linear").alpha_sigma(t)
    torch.testing.assert_close(alpha**2, abar)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    alpha, _ = make("ddpm", "cosine").alpha_sigma(t)
    torch.testing.assert_close(alpha**2, torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize("family,name", ALL)
def test_t_of_lambda_inverts_lambda(family, name):
    s = make(family, name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    torch.testing.assert_close(s.t_of_lambda(s.lambda_(t)), t, atol=1e-9, rtol=0)


def test_unknown_family_is_a_clear_error():
    from diffx.errors import DiffxError

    with pytest.raises(DiffxError, match="schedule=linear"):
        schedules.linear("edm")


def test_dtype_follows_t():
    a, s = make("flow", "cosine").alpha_sigma(torch.tensor([0.3], dtype=torch.float32))
    assert a.dtype == torch.float32 and s.dtype == torch.float32


@pytest.mark.parametrize("family,name", ALL)
def test_table_is_alpha_sigma_as_floats(family, name):
    s = make(family, name)
    ts = torch.linspace(1, 0, 11, dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(ts)
    assert s.table(ts) == list(zip(alpha.tolist(), sigma.tolist()))


def test_t_min_is_the_first_trained_step():
    assert make("ddpm", "linear").t_min == pytest.approx(1e-3)
    assert make("flow", "linear").t_min == 0.0
