"""Uncertainty through a whole sampling run: the mean and per-pixel variance of the sample ``x_0``.

BayesDiff (Kou et al. 2024, sec. 3.2, eq. 8-10) carries the mean and variance of ``x_t`` through the
sampler's steps, ``Var x_s = a^2 Var x_t + b^2 Var eps_t + 2 a b Cov(x_t, eps_t)``, each step's weight
uncertainty entering as if independent of the earlier steps', and the covariance estimated by sampling
``x_t``. Here the posterior draw is one weight setting for the whole run, as a real model is (so the
steps' errors add coherently), and the run is linearised in it instead.

Every deterministic diffx sampler is linear in the denoiser's outputs with coefficients that do not
depend on x (a DDIM / Euler step ``a x + b x0_hat + c noise_hat``, DPM-Solver++'s weighted x0_hats, ...),
and so is the objective's ``to_x0_noise``. A perturbation ``dtheta`` of the head's weights changes each
prediction by ``head_dtheta(f)`` -- linear in the head's input f -- so, to first order and holding the
features fixed, the sample moves by ``head_dtheta(G) + beta db`` where G is the same linear combination
of the steps' features that the sampler makes of their predictions, and beta the sum of its
coefficients. ``Tangent`` carries ``(x, G, beta)`` through the unchanged sampler code (it supports the
``+``, ``-``, scalar ``*`` and ``/`` that the samplers use), and at the end one closed-form head variance
(``diffx.uncertainty.predictive``) gives ``Var x_0 = conv(G * G, var_W) + beta^2 var_b`` (diag) -- one
extra head application for the whole run, the same identity as the guided variance.

What is approximated, and measured against Monte Carlo over whole runs with shared draws
(``diffx.uncertainty.mc``, tests/test_uncertainty_propagate.py, the README):

1. first order in ``dtheta`` (exact for one step; the posterior is narrow, so the second order is small);
2. the network's Jacobian in its input, the path ``dtheta -> dx_t -> d features -> d pred``, is not
   carried as a matrix: per image and step it is replaced by one number, its Rayleigh quotient
   ``kappa = <d, J d> / <d, d>`` along ``d``, one posterior realisation of the current perturbation
   of x_t (a fixed draw ``probe`` of the head's weights applied to G), by a finite difference: one more
   forward per step. So ``d pred = head_dtheta(f) + kappa dx``, which stays in the (G, beta) form.
   Without it (``probe=None``: the features held at the mean path) the variance of a trained model's
   samples came out 10-20x too large, since a denoiser contracts perturbations of its input;
3. the x0 clipping of pixel models (``x0_range``): its Jacobian ``diag(inside)`` is replaced, like the
   network's, by its Rayleigh quotient along the probe's realisation of the x0 perturbation (the share
   of its energy on unclipped pixels); at the last step, where the sample is x0_hat itself, it is
   exact (``moments``: a pixel clipped there has no variance). Without it an eps-prediction model,
   whose x0_hat near t = 1 is its output times sigma / alpha ~ 10^4, came out 10^4-10^8 x too large;
4. only per-pixel variances are reported (the covariance between pixels is carried implicitly in G
   until the end, not approximated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from diffx.errors import DiffxError
from diffx.tensors import bcast
from diffx.uncertainty.predictive import guided_features, variance


@dataclass
class Tangent:
    """A sample ``x`` (B, C, H, W) and its first-order dependence on the head's weights: moving them by
    ``(dW, db)`` moves x by ``to_image(conv(G, dW)) + beta db``; G has the head input's shape, beta (B,)."""

    x: Tensor
    g: Tensor | None
    beta: Tensor

    def _lin(self, other: "Tangent", a: float, b: float) -> "Tangent":
        return Tangent(a * self.x + b * other.x, _axpby(a, self.g, b, other.g), a * self.beta + b * other.beta)

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum() starts from 0
            return self
        return self._lin(_tangent(other), 1.0, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        return self._lin(_tangent(other), 1.0, -1.0)

    def __mul__(self, k):
        if not isinstance(k, (int, float)):
            raise TypeError(f"a Tangent scales by a number, not {type(k).__name__}: the sampler is not linear in x")
        return Tangent(k * self.x, None if self.g is None else k * self.g, k * self.beta)

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self * (1.0 / k)

    def __neg__(self):
        return self * -1.0

    @property
    def shape(self):
        return self.x.shape

    @property
    def device(self):
        return self.x.device

    @property
    def dtype(self):
        return self.x.dtype


def _axpby(a: float, u: Tensor | None, b: float, v: Tensor | None) -> Tensor | None:
    """``a u + b v`` where None stands for zero (no dependence on the weights yet)."""
    if u is None:
        return None if v is None else b * v
    return a * u if v is None else a * u + b * v


def _tangent(v) -> Tangent:
    if not isinstance(v, Tangent):
        raise TypeError(f"cannot combine a Tangent with {type(v).__name__}: the sampler is not linear in x")
    return v


def start(z: Tensor) -> Tangent:
    """The start noise: it does not depend on the weights."""
    return Tangent(z, None, torch.zeros(z.shape[0], device=z.device, dtype=z.dtype))


class TangentDenoiser:
    """``denoise(Tangent, t) -> (x0_hat, noise_hat)`` as Tangents: the mean path is the model's own
    denoiser (guided, x0 clipped as ``diffx.samplers.denoiser`` does); the tangents follow from
    ``to_x0_noise`` being linear in ``(pred, x_t)``: applied to ``(f, G)`` for the weights and to
    ``(1, beta)`` for the bias."""

    # The samplers' divergence guard (diffx.samplers.guard) watches plain tensors; ``run`` checks the
    # Tangent's result for non-finite values itself.
    checked = True

    def __init__(self, model, objective, cond=None, uncond=None, cfg_scale: float = 1.0, x0_range=None,
                 probe: Tensor | None = None, step: float = 1e-2):
        self.model, self.objective, self.cond, self.uncond = model, objective, cond, uncond
        self.cfg_scale, self.x0_range, self.nfe = float(cfg_scale), x0_range, 0
        self.probe, self.step = probe, step  # a draw of theta - theta_map (outputs, K+1); the finite difference's RMS

    def pred(self, x: Tensor, tb: Tensor) -> tuple[Tensor, Tensor]:
        """The head's (guided) input and the network output at ``x``."""
        f = guided_features(self.model, x, tb, self.cond, self.uncond, self.cfg_scale)
        return f, self.model.to_image(self.model.head(f))

    def realise(self, g: Tensor, beta: Tensor, like: Tensor) -> Tensor:
        """The probe's realisation ``to_image(conv(G, dW)) + beta db`` of a perturbation, shaped like x."""
        head = self.model.head
        theta = self.probe.to(device=g.device, dtype=g.dtype)
        weights = {"weight": theta[:, :-1].reshape(head.weight.shape), "bias": torch.zeros_like(theta[:, -1])}
        shift = functional_call(head, {"weight": torch.zeros_like(weights["weight"]), "bias": theta[:, -1]}, (g,))
        return self.model.to_image(functional_call(head, weights, (g,)) + bcast(beta, shift) * shift).to(like.dtype)

    def kappa(self, p: Tangent, tb: Tensor, pred: Tensor) -> Tensor:
        """(B,) ``<d, J d> / <d, d>`` with J the output's Jacobian in x and d the probe's realisation of
        the perturbation of x (item 2 of the module's list); 0 without a probe."""
        if self.probe is None or p.g is None:
            return torch.zeros_like(p.beta)
        x = p.x
        d = self.realise(p.g, p.beta, x)
        norm = d.flatten(1).pow(2).sum(1)
        eps = self.step * (d[0].numel() / norm.clamp(min=1e-30)).sqrt()  # eps d has RMS `step` per image
        _, moved = self.pred(x + bcast(eps, x) * d, tb)
        jd = (moved - pred) / bcast(eps, x)
        return torch.where(norm > 0, (d * jd).flatten(1).sum(1) / norm.clamp(min=1e-30), torch.zeros_like(norm))

    def unclipped(self, g: Tensor, beta: Tensor, inside: Tensor) -> Tensor:
        """(B,) the share of the x0 perturbation's energy on the pixels the clip lets through (item 3): the
        clip's Jacobian ``diag(inside)`` by its Rayleigh quotient along the probe's realisation (without a
        probe, the share of pixels inside)."""
        if self.probe is None:
            return inside.flatten(1).to(beta.dtype).mean(1)
        d2 = self.realise(g, beta, inside.float()).pow(2).flatten(1)
        total = d2.sum(1)
        share = (d2 * inside.flatten(1)).sum(1) / total.clamp(min=1e-30)
        return torch.where(total > 0, share, torch.ones_like(share)).to(beta.dtype)

    def __call__(self, p: Tangent, t: float) -> tuple[Tangent, Tangent]:
        if not isinstance(p, Tangent):
            raise TypeError("TangentDenoiser is called on a Tangent (diffx.uncertainty.propagate.start)")
        self.nfe += 1
        x = p.x
        tb = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float64 if x.dtype == torch.float64
                        else torch.float32)
        f, pred = self.pred(x, tb)
        kappa = self.kappa(p, tb, pred).to(p.beta.dtype)
        x0, noise = self.objective.to_x0_noise(pred, x, tb)
        g = torch.zeros_like(f) if p.g is None else p.g
        # d pred = head_dtheta(f) + kappa dx: in (G, beta) form, (f + kappa G, 1 + kappa beta)
        g_x0, g_noise = self.objective.to_x0_noise(f + bcast(kappa, g).to(g.dtype) * g, g, tb)
        b_x0, b_noise = self.objective.to_x0_noise(1 + kappa * p.beta, p.beta, tb)
        if self.x0_range is not None:
            lo, hi = self.x0_range
            keep = self.unclipped(g_x0, b_x0, (x0 > lo) & (x0 < hi))
            x0 = x0.clamp(lo, hi)
            alpha, sigma = self.objective.schedule.alpha_sigma(tb)
            noise = (x - bcast(alpha, x).to(x.dtype) * x0) / bcast(sigma, x).to(x.dtype)
            g_x0, b_x0 = bcast(keep, g_x0).to(g.dtype) * g_x0, keep * b_x0
            # noise_hat = (x - alpha x0) / sigma, with the clipped x0
            g_noise = (g - bcast(alpha, g).to(g.dtype) * g_x0) / bcast(sigma, g).to(g.dtype)
            b_noise = (p.beta - alpha.to(b_x0.dtype) * b_x0) / sigma.to(b_x0.dtype)
        return Tangent(x0, g_x0, b_x0.to(x.dtype)), Tangent(noise, g_noise, b_noise.to(x.dtype))


def run(plan, schedule, denoise: TangentDenoiser, z: Tensor) -> Tangent:
    """The plan from ``z`` on Tangents; a stochastic sampler (fresh noise per step) is refused."""
    if not plan.deterministic:
        raise DiffxError(f"sampler={plan.name} draws fresh noise every step; uncertainty propagation needs a "
                         "deterministic one (ddim, euler, dpmpp, ...)")
    try:
        out = plan(denoise, schedule, start(z))
    except (TypeError, AttributeError) as e:
        raise DiffxError(f"sampler={plan.name} is not written as a linear combination of the denoiser's outputs "
                         f"({e}); uncertainty propagation supports ddim, euler, heun, dpmpp, dpmpp_3m, unipc, ipndm") from None
    if not bool(torch.isfinite(out.x).all()) or (out.g is not None and not bool(torch.isfinite(out.g).all())):
        raise DiffxError(f"sampler={plan.name} diverged (a non-finite sample or variance); try another sampler= "
                         "or more steps=")
    return out


def moments(model, posterior, sample: Tangent, x0_range=None) -> tuple[Tensor, Tensor]:
    """``(mean, variance)`` of the sample, each shaped like x. With ``x0_range`` the pixels on its bounds
    were clipped at the last step, where the sample is x0_hat itself: to first order they do not move."""
    if sample.g is None:
        return sample.x, torch.zeros_like(sample.x)
    var = variance(model, posterior, sample.g, sample.beta)
    if x0_range is not None:
        var = torch.where((sample.x <= x0_range[0]) | (sample.x >= x0_range[1]), torch.zeros_like(var), var)
    return sample.x, var
