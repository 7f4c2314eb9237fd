"""Samplers: pure loops over a denoiser, a schedule, the start noise and a time grid.

Every sampler has the signature ``sampler(denoise, schedule, x, ts, generator=None, **options)``
and returns the clean sample. ``denoise(x, t) -> (x0_hat, noise_hat)`` hides the network, its
parameterisation and classifier-free guidance (``make_denoiser``), so the samplers are
parameterisation-free. ``ts`` is a decreasing 1-D grid from the start time to 0 (see grids.py);
the model is queried at exactly those continuous times, and the last step lands on t = 0.

The single-step samplers are here; the multistep ones (DPM-Solver++, UniPC, iPNDM) are in
multistep.py and re-exported, so ``diffx.samplers.<name>`` names every sampler.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from diffx import conditioning
from diffx.objectives import bcast
from diffx.multistep import dpmpp, dpmpp_3m, dpmpp_sde, ipndm, unipc  # noqa: F401 -- one namespace of samplers
from diffx.noise import randn

Denoise = Callable[[Tensor, float], tuple[Tensor, Tensor]]


class Denoiser:
    """``denoise(x, t) -> (x0_hat, noise_hat)`` with classifier-free guidance (Ho & Salimans 2022).

    With ``cfg_scale != 1`` the conditional and unconditional passes run as one batched forward, and
    the guided output is ``pred_u + w (pred_c - pred_u)``. The objective's inverse is affine, so this
    is the same guidance on x0_hat and noise_hat for every objective. ``nfe`` counts network calls.

    With ``x0_range`` (the data's range, e.g. (-1, 1) in pixel space) x0_hat is clipped to it and
    noise_hat recomputed to match, as DDPM's ``clip_sample`` does (Ho et al. 2020, official code): where
    alpha is tiny (the cosine schedule's alpha(1) ~ 5e-5) an eps-prediction's x0_hat is its error
    amplified 10^4 times, and no sample of the data lies outside its range.
    """

    def __init__(self, model, objective, cond=None, uncond=None, cfg_scale: float = 1.0, x0_range=None):
        self.model, self.objective, self.cfg_scale = model, objective, float(cfg_scale)
        self.x0_range = x0_range
        self.cond = cond
        self.guided = cond is not None and self.cfg_scale != 1.0
        self.both = conditioning.cat(cond, uncond if uncond is not None else conditioning.null_like(cond)) \
            if self.guided else None
        self.nfe = 0

    def __call__(self, x: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """``t``: a float, or a 0-dim tensor when a gradient must reach the time (``learned.fit``)."""
        self.nfe += 1
        # t in float32 (float64 only for float64 analysis), whatever autocast does to x
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if isinstance(t, Tensor):
            tb = t.to(device=x.device, dtype=t_dtype).expand(x.shape[0])
        else:
            tb = torch.full((x.shape[0],), float(t), device=x.device, dtype=t_dtype)
        if not self.guided:
            pred = self.model(x, tb, self.cond)
        else:
            pred_c, pred_u = self.model(torch.cat([x, x]), torch.cat([tb, tb]), self.both).chunk(2)
            pred = pred_u + self.cfg_scale * (pred_c - pred_u)
        x0, noise = self.objective.to_x0_noise(pred, x, tb)
        if self.x0_range is None:
            return x0, noise
        x0 = x0.clamp(*self.x0_range)
        alpha, sigma = (bcast(v, x).to(x.dtype) for v in self.objective.schedule.alpha_sigma(tb))
        return x0, (x - alpha * x0) / sigma


def make_denoiser(model, objective, cond=None, uncond=None, cfg_scale: float = 1.0, x0_range=None) -> Denoiser:
    """The only place classifier-free guidance (and x0 clipping) lives (ARCHITECTURE.md section 2)."""
    return Denoiser(model, objective, cond, uncond, cfg_scale, x0_range)


@torch.no_grad()
def ddim(denoise: Denoise, schedule, x: Tensor, ts: Tensor, generator=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12), for any (alpha, sigma) path.

    ``x <- alpha_s x0_hat + sqrt(sigma_s^2 - c^2) noise_hat + c z`` with
    ``c = eta (sigma_s / sigma_t) sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2)``: eta = 0 is the
    deterministic sampler (Euler on the probability-flow ODE in sigma/alpha), eta = 1 is DDPM's
    ancestral sampler (Ho et al. 2020, Alg. 2).
    """
    ab = schedule.table(ts)
    for i in range(len(ts) - 1):
        x0, noise = denoise(x, ts[i].item())
        (a_t, s_t), (a_s, s_s) = ab[i], ab[i + 1]
        c = eta * (s_s / s_t) * math.sqrt(max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0)) if eta else 0.0
        x = a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * noise
        if c > 0:
            x = x + c * randn(x.shape, generator, x.device, x.dtype)
    return x


def ddpm(denoise: Denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """Ancestral sampling from the posterior ``q(x_s | x_t, x0_hat)`` (Ho et al. 2020, Alg. 2)."""
    return ddim(denoise, schedule, x, ts, generator, eta=1.0)


def euler(denoise: Denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """Euler on the probability-flow ODE ``dy/ds = noise_hat`` in ``y = x / alpha, s = sigma / alpha``
    (Karras et al. 2022, Alg. 1 without the correction; k-diffusion's ``sample_euler``).

    Written back in x this is ``x <- alpha_s x0_hat + sigma_s noise_hat``, which stays finite where
    alpha = 0 (the pure-noise end of the flow path). It coincides with deterministic DDIM, and on
    the rectified-flow path with Euler in t on the velocity.
    """
    return ddim(denoise, schedule, x, ts, generator, eta=0.0)


@torch.no_grad()
def heun(denoise: Denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE in ``s = sigma / alpha``
    (Karras et al. 2022, Alg. 1). Two network calls per step, except the last step into t = 0 and a
    step out of alpha = 0 (an infinite step in s), which take the Euler step as Alg. 1 does.
    """
    ab = schedule.table(ts)
    for i in range(len(ts) - 1):
        (a_t, s_t), (a_s, s_s) = ab[i], ab[i + 1]
        x0, noise = denoise(x, ts[i].item())
        x_next = a_s * x0 + s_s * noise
        if s_s > 0 and a_t > 0:
            _, noise_next = denoise(x_next, ts[i + 1].item())
            # trapezoid in s: y_s = y_t + (s_s - s_t) (eps_t + eps_s) / 2, times alpha_s
            x_next = x_next + (s_s - a_s * s_t / a_t) * (noise_next - noise) / 2
        x = x_next
    return x
