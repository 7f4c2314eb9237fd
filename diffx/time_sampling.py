"""Training-time distributions over t in (0, 1): which noise levels the loss sees most often.

Each is a function ``(n, device, generator) -> u`` with ``u`` of shape (n,), float32, strictly in (0, 1).
``flow_shift`` warps t toward noise, for training (``objective.shift``) and sampling (``grid.shift``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS = 1e-5  # keep u off the end points, where some parameterisations are singular


def flow_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, eq. 23): the same
    signal-to-noise ratio that t had at a resolution ``shift^2`` times fewer pixels."""
    return shift * t / (1 + (shift - 1) * t)


def uniform(n: int, device=None, generator=None) -> Tensor:
    """``u ~ U(0, 1)``: the DDPM recipe (Ho et al. 2020, Alg. 1)."""
    u = torch.rand(n, device=device, generator=generator)
    return u.clamp(_EPS, 1 - _EPS)


def logit_normal(n: int, device=None, generator=None, loc: float = 0.0, scale: float = 1.0) -> Tensor:
    """``logit(u) ~ N(loc, scale)``: emphasises the middle of the path (Esser et al. 2024, SD3, eq. 19)."""
    z = torch.randn(n, device=device, generator=generator) * scale + loc
    return torch.sigmoid(z).clamp(_EPS, 1 - _EPS)


def mode(n: int, device=None, generator=None, s: float = 1.29) -> Tensor:
    """Mode sampling with heavy tails, ``f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)`` (SD3, eq. 20)."""
    u = torch.rand(n, device=device, generator=generator)
    t = 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return t.clamp(_EPS, 1 - _EPS)


def gaussian(n: int, device=None, generator=None, loc: float = 0.5, scale: float = 0.25) -> Tensor:
    """``u ~ N(loc, scale)`` truncated to (0, 1), sampled exactly by the inverse CDF."""
    f64 = dict(dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(loc, **f64), torch.tensor(scale, **f64))
    lo, hi = normal.cdf(torch.tensor(0.0, dtype=torch.float64)), normal.cdf(torch.tensor(1.0, dtype=torch.float64))
    p = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return normal.icdf(p).to(device=device, dtype=torch.float32).clamp(_EPS, 1 - _EPS)
