"""Noise schedules: signal and noise level at time t.

Convention (ARCHITECTURE.md section 2): ``x_t = alpha(t) * x0 + sigma(t) * noise`` with ``t`` in
[0, 1], t = 0 is data and t = 1 is noise. A schedule is stateless: it maps ``t`` to
``(alpha, sigma)`` and their time derivatives, computed in float64 and returned in ``t``'s dtype.

The names ``linear`` and ``cosine`` mean what each family's users expect:

=========  =====================================  ==========================================
family     linear                                 cosine
=========  =====================================  ==========================================
ddpm       DDPM linear betas 1e-4..0.02, 1000     Nichol & Dhariwal cosine alpha-bar, 1000
flow       rectified flow: alpha=1-t, sigma=t     trig: alpha=cos(pi t/2), sigma=sin(pi t/2)
=========  =====================================  ==========================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffx.errors import DiffxError


class Schedule:
    """``alpha(t)``, ``sigma(t)`` and their derivatives; subclasses implement ``_alpha_sigma64``."""

    t_min: float = 0.0  # the smallest t a model is trained at (0 for a continuous path)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma, _, _ = self._eval(t)
        return alpha, sigma

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        _, _, d_alpha, d_sigma = self._eval(t)
        return d_alpha, d_sigma

    def lambda_(self, t: Tensor) -> Tensor:
        """Half log-SNR, ``lambda = log(alpha / sigma)`` (Lu et al. 2022, DPM-Solver)."""
        alpha, sigma, _, _ = self._eval(t, keep64=True)
        return (alpha.log() - sigma.log()).to(_float_dtype(t))

    def t_of_lambda(self, lam: Tensor, iters: int = 64) -> Tensor:
        """Inverse of ``lambda_`` by bisection; valid because lambda falls monotonically in t."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = self.lambda_(mid) > lam  # still too clean: the answer is later in time
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    def table(self, ts: Tensor) -> list[tuple[float, float]]:
        """``[(alpha, sigma)]`` on a sampling grid as Python floats, computed once on the CPU in float64,
        so that sampling loops never synchronise with the device."""
        alpha, sigma = self._eval(torch.as_tensor(ts).to(torch.float64).cpu(), keep64=True)[:2]
        return list(zip(alpha.tolist(), sigma.tolist()))

    def _eval(self, t: Tensor, keep64: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t = torch.as_tensor(t)
        out = self._alpha_sigma64(t.to(torch.float64))
        return out if keep64 else tuple(v.to(_float_dtype(t)) for v in out)

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError


def _float_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


class DiscreteVP(Schedule):
    """A variance-preserving schedule from a table of N betas, as DDPM (Ho et al. 2020) trains it.

    Step ``i`` (0-based, diffusers' timestep ``i``) sits at ``t = (i + 1) / N`` and t = 0 is clean data
    (alpha = 1), so a trailing grid ``linspace(1, 0, n + 1)`` visits diffusers' trailing timesteps
    exactly. Between knots ``log alpha_bar`` is linear in t, so the model can be queried at any
    continuous t and ``alpha > 0`` everywhere, including t = 1.
    """

    def __init__(self, betas: Tensor):
        self.betas = betas.to(torch.float64)
        self.num_steps = len(betas)
        self.t_min = 1.0 / self.num_steps  # DDPM trains steps 1..N, never t = 0
        log_abar = torch.cumsum(torch.log1p(-self.betas), 0)
        self.log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar])  # knots k/N, k=0..N

    def _alpha_sigma64(self, t):
        n = self.num_steps
        table = self.log_abar.to(t.device)
        i = (t * n).floor().clamp(0, n - 1).long()
        slope = (table[i + 1] - table[i]) * n  # d log(alpha_bar) / dt on this segment
        la = table[i] + (t - i.to(t.dtype) / n) * slope
        alpha, sigma = (la / 2).exp(), (-torch.expm1(la)).sqrt()
        d_alpha = alpha * slope / 2
        d_sigma = -la.exp() * slope / (2 * sigma.clamp_min(1e-30))
        return alpha, sigma, d_alpha, d_sigma


def ddpm_linear(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
    """DDPM's linear beta schedule (Ho et al. 2020, sec. 4), diffusers' ``beta_schedule="linear"``."""
    return DiscreteVP(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))


def ddpm_cosine(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteVP:
    """Cosine alpha-bar (Nichol & Dhariwal 2021, eq. 17), diffusers' ``squaredcos_cap_v2``."""

    def abar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
    return DiscreteVP(torch.tensor(betas, dtype=torch.float64))


class FlowLinear(Schedule):
    """Rectified flow / flow matching path ``alpha = 1 - t, sigma = t`` (Liu et al. 2022; SD3)."""

    def _alpha_sigma64(self, t):
        one = torch.ones_like(t)
        return 1 - t, t, -one, one


class FlowCosine(Schedule):
    """Trigonometric path ``alpha = cos(pi t / 2), sigma = sin(pi t / 2)`` (variance preserving)."""

    def _alpha_sigma64(self, t):
        half_pi = math.pi / 2
        # cos(pi / 2) is 6e-17 in floating point; the path's end must be exactly pure noise
        c = torch.where(t == 1, torch.zeros_like(t), torch.cos(half_pi * t))
        s = torch.sin(half_pi * t)
        return c, s, -half_pi * s, half_pi * c


# The option name -> schedule, per objective family (the family is the objective's, see objectives.py).
_LINEAR = {"ddpm": ddpm_linear, "flow": FlowLinear}
_COSINE = {"ddpm": ddpm_cosine, "flow": FlowCosine}


def linear(family: str, **kwargs) -> Schedule:
    """``schedule=linear``: DDPM's linear betas for ``ddpm``, the rectified-flow path for ``flow``."""
    return _pick(_LINEAR, family, "linear")(**kwargs)


def cosine(family: str, **kwargs) -> Schedule:
    """``schedule=cosine``: cosine alpha-bar for ``ddpm``, the trig path for ``flow``."""
    return _pick(_COSINE, family, "cosine")(**kwargs)


def _pick(table: dict, family: str, name: str):
    if family not in table:
        raise DiffxError(f"schedule={name}: unknown objective family {family!r}; expected one of {sorted(table)}")
    return table[family]
