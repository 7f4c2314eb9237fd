"""The denoiser every sampler calls: ``denoise(x, t) -> (x0_hat, noise_hat)``.

It hides the network, its parameterisation (the objective's ``to_x0_noise``) and classifier-free
guidance, so the samplers are parameterisation-free (ARCHITECTURE.md section 2).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from diffx import conditioning
from diffx.errors import DiffxError
from diffx.tensors import bcast

Denoise = Callable[[Tensor, float], tuple[Tensor, Tensor]]


class Denoiser:
    """``denoise(x, t) -> (x0_hat, noise_hat)`` with classifier-free guidance (Ho & Salimans 2022).

    With ``cfg_scale != 1`` the conditional and unconditional passes run as one batched forward, and
    the guided output is ``pred_u + w (pred_c - pred_u)``. The objective's inverse is affine, so this
    is the same guidance on x0_hat and noise_hat for every objective. ``nfe`` counts network calls
    (a guided call is one call on a doubled batch). The scale ``w`` is a float, or a (B,) tensor of one
    scale per sample (guided distillation draws one per training sample, Meng et al. 2023 sec. 4.1);
    a tensor scale always runs the guided pass.

    Two options of the guidance (both off by default, which is plain CFG exactly):

    - ``rescale`` (phi, Lin et al. 2024, "Common diffusion noise schedules and sample steps are
      flawed", sec. 3.4, eq. 15-16): the guided prediction's per-sample std is pulled back toward the
      conditional one's, ``pred = phi * pred_cfg * std(pred_c) / std(pred_cfg) + (1 - phi) * pred_cfg``,
      on the network output as in the paper's listing, against the over-exposure of large scales;
    - ``interval`` ``(t_lo, t_hi)`` (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
      improves sample and distribution quality"): guidance only for ``t_lo <= t <= t_hi`` (diffx's t:
      0 data, 1 noise); outside it the plain conditional prediction, from a conditional-only forward
      (half the batch).

    With ``x0_range`` (the data's range, e.g. (-1, 1) in pixel space) x0_hat is clipped to it and
    noise_hat recomputed to match, as DDPM's ``clip_sample`` does (Ho et al. 2020, official code): where
    alpha is tiny (the cosine schedule's alpha(1) ~ 5e-5) an eps-prediction's x0_hat is its error
    amplified 10^4 times, and no sample of the data lies outside its range.
    """

    def __init__(self, model, objective, cond=None, uncond=None, cfg_scale: float | Tensor = 1.0, x0_range=None,
                 rescale: float = 0.0, interval=None):
        self.model, self.objective, self.cfg_scale = model, objective, _check_scale(cfg_scale)
        self.x0_range = x0_range
        self.cond = cond
        self.rescale, self.interval = _check_rescale(rescale), _check_interval(interval)
        self.guided = cond is not None and (isinstance(self.cfg_scale, Tensor) or self.cfg_scale != 1.0)
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
        if self.guided and self._guides_at(t):
            pred = self._guided(x, tb)
        else:
            pred = self.model(x, tb, self.cond)
        x0, noise = self.objective.to_x0_noise(pred, x, tb)
        if self.x0_range is None:
            return x0, noise
        x0 = x0.clamp(*self.x0_range)
        alpha, sigma = (bcast(v, x).to(x.dtype) for v in self.objective.schedule.alpha_sigma(tb))
        return x0, (x - alpha * x0) / sigma

    def _guides_at(self, t) -> bool:
        if self.interval is None:
            return True
        t = float(t)  # a Python float or a CPU time: no device sync
        return self.interval[0] <= t <= self.interval[1]

    def _guided(self, x: Tensor, tb: Tensor) -> Tensor:
        """CFG on the network output, one batched forward of both conditions; then the rescale."""
        pred_c, pred_u = self.model(torch.cat([x, x]), torch.cat([tb, tb]), self.both).chunk(2)
        w = bcast(self.cfg_scale.to(pred_c.device, pred_c.dtype), pred_c) if isinstance(self.cfg_scale, Tensor) \
            else self.cfg_scale  # (B, 1, ..., 1) per sample, or one float
        pred = pred_u + w * (pred_c - pred_u)
        if not self.rescale:
            return pred
        dims = tuple(range(1, pred.ndim))
        factor = pred_c.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True).clamp_min(1e-12)
        return self.rescale * pred * factor + (1 - self.rescale) * pred


def _check_scale(scale) -> float | Tensor:
    """The guidance scale: one float, or a (B,) tensor of one scale per sample."""
    if isinstance(scale, Tensor) and scale.ndim == 1:
        return scale
    if isinstance(scale, Tensor) and scale.ndim == 0:
        return float(scale)
    if isinstance(scale, Tensor):
        raise DiffxError(f"cfg_scale of shape {tuple(scale.shape)}: expected a number or a (B,) tensor, one scale "
                         "per sample")
    return float(scale)


def _check_rescale(rescale) -> float:
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0.0 <= rescale <= 1.0:
        raise DiffxError(f"guidance.rescale={rescale}: expected a number in [0, 1] (phi of Lin et al. 2024; 0 = plain CFG)")
    return float(rescale)


def _check_interval(interval) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        lo, hi = math.nan, math.nan
    if not 0.0 <= lo <= hi <= 1.0:
        raise DiffxError(f"guidance.interval={interval}: expected [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 "
                         "(t: 0 data, 1 noise), or null for every step")
    return lo, hi


def make_denoiser(model, objective, cond=None, uncond=None, cfg_scale: float | Tensor = 1.0, x0_range=None,
                  rescale: float = 0.0, interval=None) -> Denoiser:
    """The only place classifier-free guidance (its rescale and interval too) and x0 clipping live
    (ARCHITECTURE.md section 2)."""
    return Denoiser(model, objective, cond, uncond, cfg_scale, x0_range, rescale, interval)
