"""Uncertainty through whole sampling runs (diffx.uncertainty.propagate) against the exact answer where
the linearisation is exact, against Monte Carlo over whole runs with shared weight draws, and the
Tangent through every deterministic sampler."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from diffx.samplers import plan as plans
from diffx.samplers.denoiser import make_denoiser
from diffx.samplers.multistep import dpmpp, dpmpp_3m, dpmpp_sde, ipndm, unipc
from diffx.samplers.single import ddim, ddpm, euler, heun
from diffx.grids import uniform
from diffx.errors import DiffxError
from diffx.uncertainty import laplace, mc, propagate
from diffx.uncertainty.mc import _split

from conftest import make_objective

SAMPLERS = {"ddim": ddim, "euler": euler, "heun": heun, "dpmpp": dpmpp, "dpmpp_3m": dpmpp_3m, "unipc": unipc,
            "ipndm": ipndm}


class TimeOnly(nn.Module):
    """A model whose features depend on t and the label but not on x: the one case where holding the
    features at the mean path is exact, so the propagated variance must equal the exact one."""

    def __init__(self, channels: int = 2, width: int = 4, size: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = nn.Parameter(torch.randn(2, width, size, size, generator=g, dtype=torch.float64))
        self.conv = nn.Conv2d(width, channels, 3, padding=1).double()
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    @property
    def head(self):
        return self.conv

    def to_image(self, y):
        return y

    def features(self, x, t, cond=None):
        label = torch.zeros(x.shape[0], dtype=torch.long) if cond is None else cond["label"].clamp(min=0)
        f = self.base[label % 2] * torch.cos(3 * t.to(x.dtype)).reshape(-1, 1, 1, 1)
        return f + (cond is not None) * (cond["label"] < 0).to(x.dtype).reshape(-1, 1, 1, 1)

    def forward(self, x, t, cond=None):
        return self.to_image(self.head(self.features(x, t, cond)))


class WithHead(nn.Module):
    """``model`` with the head's parameters replaced by ``theta`` (outputs, K+1)."""

    def __init__(self, model, theta):
        super().__init__()
        self.model, self.theta = model, theta

    def forward(self, x, t, cond=None):
        return self.model.to_image(functional_call(self.model.head, _split(self.model.head, self.theta),
                                                   (self.model.features(x, t, cond),)))


def _posterior(head, structure, scale=1.0):
    g = torch.Generator().manual_seed(1)
    k = laplace.head_params(head).shape[1]
    u = torch.randn(3 * k, k, generator=g, dtype=torch.float64)
    c = laplace.Curvature(u.T @ u, 1.0, 10, 0.0, head.weight.shape[0], 1.0, 10)
    return laplace.Posterior.from_curvature(c, structure, prior_precision=1.0 / scale, noise=1.0, sha256="x")


def _setup(family="flow", schedule="linear", **kw):
    model = TimeOnly()
    objective = make_objective(family, schedule, **kw)
    z = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return model, objective, z, {"label": torch.tensor([0, 1, 1])}


def _plan(sampler, schedule, steps=6):
    return plans.make(sampler, uniform, steps, schedule)


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "heun"])
@pytest.mark.parametrize("objective", [("flow", "linear", {}), ("ddpm", "cosine", {"prediction": "v"})])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_propagated_variance_is_exact_when_the_features_do_not_see_x(structure, sampler, objective, cfg_scale):
    """The sample is then affine in the head's weights, so its exact covariance is J Sigma J^T with J
    read off column by column; the Tangent's closed form must equal it to round-off."""
    family, sched, kw = objective
    model, obj, z, cond = _setup(family, sched, **kw)
    post = _posterior(model.head, structure)
    plan = _plan(SAMPLERS[sampler], obj.schedule)
    uncond = {"label": torch.full((3,), -1)}
    denoise = propagate.TangentDenoiser(model, obj, cond, uncond, cfg_scale)
    mean, var = propagate.moments(model, post, propagate.run(plan, obj.schedule, denoise, z))

    theta = laplace.head_params(model.head).detach()

    def sample(th):
        return plan(make_denoiser(WithHead(model, th), obj, cond, uncond, cfg_scale), obj.schedule, z)

    base = sample(theta)
    cols = []
    for p in range(theta.numel()):
        e = torch.zeros(theta.numel(), dtype=theta.dtype)
        e[p] = 1.0
        cols.append((sample(theta + e.reshape(theta.shape)) - base).flatten())
    j = torch.stack(cols, 1)  # (M, P): exact, the sample being affine in theta
    cov = torch.block_diag(*[post.cov] * theta.shape[0]) if structure == "kron" else torch.diag(post.cov.flatten())
    exact = torch.einsum("mp,pq,mq->m", j, cov, j).reshape(z.shape)
    torch.testing.assert_close(mean, base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, exact, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_the_mean_path_is_the_ordinary_sample_for_every_deterministic_sampler(sampler):
    model, obj, z, cond = _setup()
    plan = _plan(SAMPLERS[sampler], obj.schedule)
    out = propagate.run(plan, obj.schedule, propagate.TangentDenoiser(model, obj, cond), z)
    torch.testing.assert_close(out.x, plan(make_denoiser(model, obj, cond), obj.schedule, z), rtol=1e-12, atol=1e-12)
    assert out.g is not None and out.g.shape == (3, 4, 6, 6) and out.beta.shape == (3,)


@pytest.mark.parametrize("sampler", [ddpm, dpmpp_sde])
def test_a_stochastic_sampler_is_refused(sampler):
    model, obj, z, cond = _setup()
    plan = _plan(functools.partial(sampler), obj.schedule)
    with pytest.raises(DiffxError, match="deterministic"):
        propagate.run(plan, obj.schedule, propagate.TangentDenoiser(model, obj, cond), z)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_monte_carlo_over_whole_runs_with_shared_draws_converges_to_it(cfg_scale):
    """mc.run_moments (one draw per run, shared by every step and both guidance branches) against the
    propagated closed form, within MC's sqrt(2 / (n - 1)) band."""
    from diffx.build import Parts
    from diffx.latent import Identity

    model, obj, z, cond = _setup()
    post = _posterior(model.head, "kron")
    plan = _plan(dpmpp, obj.schedule)
    uncond = {"label": torch.full((3,), -1)}
    denoise = propagate.TangentDenoiser(model, obj, cond, uncond, cfg_scale)
    _, var = propagate.moments(model, post, propagate.run(plan, obj.schedule, denoise, z))

    class Labels:
        guidable = True

        def encode(self, inputs, device=None):
            return {"label": torch.tensor(list(inputs))}

        def null(self, n, device=None):
            return {"label": torch.full((n,), -1)}

    latent = Identity()
    latent.x0_range = None
    parts = Parts(model=model, objective=obj, latent=latent, condition=Labels())
    n = 300
    _, mc_var = mc.run_moments(parts, plan, [0, 1, 1], None, cfg_scale, z, post, n, chunk=100,
                               generator=torch.Generator().manual_seed(3))
    rel = (mc_var / var - 1).flatten()
    assert rel.pow(2).mean().sqrt() < 1.5 * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("probe", [True, False])
def test_the_clip_passes_what_it_lets_through(probe):
    """A clip range that clips nothing changes nothing; one that clips every pixel leaves no variance."""
    model, obj, z, cond = _setup("ddpm", "cosine", prediction="eps")
    post = _posterior(model.head, "kron")
    plan = _plan(dpmpp, obj.schedule)
    draw = post.sample(1, model.head.weight.shape[0], torch.Generator().manual_seed(0))[0] if probe else None

    def run(x0_range):
        denoise = propagate.TangentDenoiser(model, obj, cond, None, 1.0, x0_range, probe=draw)
        return propagate.moments(model, post, propagate.run(plan, obj.schedule, denoise, z), x0_range)

    free, wide = run(None), run((-1e30, 1e30))
    torch.testing.assert_close(wide[1], free[1], rtol=1e-9, atol=0)
    assert run((0.0, 0.0))[1].abs().max() == 0
