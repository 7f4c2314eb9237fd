"""Order of accuracy: on Gaussian data the probability-flow ODE is solved in closed form, so the error
of each deterministic sampler can be measured exactly; doubling the steps must divide it by about
2^order.

The grid is log-SNR uniform (equal steps for the exponential integrators) and the reference is the
exact ODE solution at the grid's last noise level ``sigma_min`` followed by the same final x0_hat step,
so the fixed jump from sigma_min to 0 (not a discretisation error) does not mask the rate.
"""

import math

import pytest
import torch

from analytic import GaussianModel
from conftest import make_objective
from diffx import grids, samplers

SCHEDULES = [(f, s) for f in ("ddpm", "flow") for s in ("linear", "cosine")]
# (sampler, options, theoretical order, steps): steps in the asymptotic range of each
ORDERS = [
    ("ddim", {}, 1, (16, 32)),
    ("euler", {}, 1, (16, 32)),
    ("heun", {}, 2, (16, 32)),
    ("dpmpp", {}, 2, (32, 64)),
    ("ipndm", {}, 2, (32, 64)),  # equal-step Adams-Bashforth coefficients on an unequal grid: order 2
    ("dpmpp_3m", {}, 3, (16, 32)),
    ("unipc", {}, 3, (32, 64)),  # order-2 predictor + UniC corrector
    ("unipc", {"order": 3}, 4, (16, 32)),
]


def endpoint_error(sampler, options, family, schedule, steps):
    obj = make_objective(family, schedule)
    model = GaussianModel(obj, mu=0.5, s=0.3)
    z = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = grids.logsnr(steps, obj.schedule)
    out = getattr(samplers, sampler)(samplers.make_denoiser(model, obj), obj.schedule, z.clone(), ts, **options)
    t_last = ts[-2].item()
    exact = model.posterior_at(model.ode_solution(z, 1.0, t_last), torch.full((64,), t_last, dtype=torch.float64))[0]
    if sampler == "ipndm":  # its last step extrapolates noise_hat to sigma = 0 instead of returning x0_hat
        exact = model.ode_endpoint(z)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("family,schedule", SCHEDULES)
@pytest.mark.parametrize("sampler,options,order,steps", ORDERS, ids=[f"{s}{o or ''}" for s, o, _, _ in ORDERS])
def test_error_falls_at_the_theoretical_order(sampler, options, order, steps, family, schedule):
    coarse, fine = (endpoint_error(sampler, options, family, schedule, n) for n in steps)
    rate = math.log2(coarse / fine)
    assert rate > order - 0.35, f"{sampler}{options}: error {coarse:.2e} -> {fine:.2e}, rate {rate:.2f} < {order}"
