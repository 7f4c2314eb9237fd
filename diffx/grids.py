"""Time grids for sampling: decreasing 1-D float64 tensors from pure noise (t = 1) down to data (t = 0).

Each grid is ``grid(steps, schedule, **options) -> ts`` with ``len(ts) == steps + 1``, ``ts[0] == 1`` and
``ts[-1] == 0``; the sampler queries the model at ``ts[:-1]``, exactly (no rounding to a training step).

``karras`` and ``logsnr`` are spaced in the noise-to-signal ratio ``s = sigma / alpha`` (Karras et al.
2022's sigma) between ``sigma_max`` and ``sigma_min`` and mapped back to t with ``schedule.t_of_lambda``.
Their first point is moved to t = 1, so sampling always starts from pure noise: above ``sigma_max`` the
denoiser returns the data mean whatever t, and the first step crosses that range at no cost. Their last
model call is at ``sigma_min``, from where the sampler's final step to t = 0 is a short one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffx.time_sampling import flow_shift

# EDM's range for data in [-1, 1] (Karras et al. 2022, sec. 5): beyond it the denoiser is the data mean
# (above) or the identity (below), so steps spent there are wasted.
SIGMA_MAX = 80.0
SIGMA_MIN = 0.002


def uniform(steps: int, schedule=None, t_max: float = 1.0, shift: float = 1.0) -> Tensor:
    """Uniform in t, starting at ``t_max`` ("trailing" spacing, Lin et al. 2024, so that the first step
    starts from pure noise), optionally shifted (``shift`` > 1 spends more steps at high noise, SD3).
    On DDPM's schedules its last step is a coarse jump (from sigma/alpha = 0.34 at 10 steps, linear
    betas): use ``logsnr`` or ``karras`` there when the final detail matters."""
    ts = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    return flow_shift(ts, shift)


def karras(steps: int, schedule, rho: float = 7.0, sigma_min: float | None = None,
           sigma_max: float = SIGMA_MAX) -> Tensor:
    """``s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` (Karras et al. 2022, eq. 5)."""
    s_min, s_max = _sigma_range(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _to_ts(schedule, -s.log())


def logsnr(steps: int, schedule, sigma_min: float | None = None, sigma_max: float = SIGMA_MAX) -> Tensor:
    """Uniform in log-SNR, ``lambda = log(alpha / sigma)``: equal steps for the exponential integrators
    (Lu et al. 2022, DPM-Solver, sec. 3.3 "logSNR" steps)."""
    s_min, s_max = _sigma_range(schedule, sigma_min, sigma_max)
    return _to_ts(schedule, torch.linspace(-math.log(s_max), -math.log(s_min), steps, dtype=torch.float64))


def _sigma_range(schedule, sigma_min: float | None, sigma_max: float) -> tuple[float, float]:
    """Clip ``[sigma_min, sigma_max]`` to what the schedule reaches; by default ``sigma_min`` is the
    schedule's smallest trained noise level (DDPM's first step), or EDM's 0.002 for a continuous path."""
    t_min = getattr(schedule, "t_min", 0.0)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([t_min, 1.0], dtype=torch.float64))
    lo, hi = (sigma / alpha).tolist()  # hi is inf where alpha(1) = 0
    s_min = max(SIGMA_MIN if sigma_min is None else sigma_min, lo)
    return s_min, min(sigma_max, hi)


def _to_ts(schedule, lam: Tensor) -> Tensor:
    """lambda nodes -> t, with the first moved to t = 1 (pure noise) and t = 0 appended."""
    ts = schedule.t_of_lambda(lam)
    ts[0] = 1.0
    return torch.cat([ts, ts.new_zeros(1)])
