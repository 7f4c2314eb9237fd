"""The denoiser every sampler calls: ``denoise(x, t) -> (x0_hat, noise_hat)``.

It hides the network, its parameterisation (the objective's ``to_x0_noise``) and classifier-free
guidance, so the samplers are parameterisation-free (ARCHITECTURE.md section 2).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from diffx import conditioning
from diffx.tensors import bcast

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
