"""Multistep samplers: one model call per step, earlier calls reused as extra interpolation nodes.

The exponential integrators (DPM-Solver++(2M), its SDE, (3M) and UniPC) solve the probability-flow
ODE, or the reverse SDE, in data-prediction form (Lu et al. 2022, DPM-Solver++, eq. 9) over
``lambda = log(alpha / sigma)``, with ``h = lambda_s - lambda_t`` and ``c = 1 + eta``:

    x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s int_0^h c e^(-c (h - u)) x0(lambda_t + u) du
          + sigma_s sqrt(1 - e^(-2 eta h)) z

where ``x0(lambda)`` is the polynomial through the last few ``x0_hat``. ``eta = 0`` is the ODE and
``eta = 1`` the SDE of Lu et al. 2022, sec. 4. The order tapers to 1 over the last steps, as
diffusers' ``lower_order_final`` does, so the step into sigma = 0 (lambda = inf) returns ``x0_hat``.

``ipndm`` is the linear-multistep alternative: Adams-Bashforth on the noise prediction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffx.noise import randn
from diffx.samplers.plan import declare


def weights(H: float, v: list[float]) -> list[float]:
    """``w_j`` with ``int_0^1 H e^(-H (1 - r)) p(r) dr ~= sum_j w_j p(v_j)`` for the polynomial p through
    nodes ``v`` (in units of the step, 0 = the current point). Two nodes take the midpoint rule
    ``(1 - e^-H) p(1/2)`` of DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and UniPC-bh2; one node or three
    and more are integrated exactly (the phi functions of Lu et al. 2022, sec. 3.3; UniPC, eq. 8)."""
    if len(v) == 2:
        return [-math.expm1(-H) * w for w in _lagrange(v, 0.5)]
    moments = torch.tensor([phi_moment(H, k) for k in range(len(v))], dtype=torch.float64)
    vander = torch.tensor([[vj**k for vj in v] for k in range(len(v))], dtype=torch.float64)  # (k, j)
    return torch.linalg.solve(vander, moments).tolist()


def phi_moment(H: float, k: int) -> float:
    """``int_0^1 H e^(-H (1 - r)) r^k dr``, by its series where the recurrence would cancel (small H)."""
    if H < 1.0:
        return H * sum((-H) ** m * math.factorial(k) / math.factorial(m + k + 1) for m in range(30))
    out = -math.expm1(-H)
    for j in range(1, k + 1):
        out = 1 - j * out / H
    return out


def _lagrange(v: list[float], at: float) -> list[float]:
    """Weights of the interpolating polynomial through nodes ``v``, evaluated at ``at``."""
    return [math.prod((at - vk) / (vj - vk) for k, vk in enumerate(v) if k != j) for j, vj in enumerate(v)]


def _lam(alpha: float, sigma: float) -> float:
    """log(alpha / sigma), +-inf at the ends of the path."""
    if sigma == 0.0:
        return math.inf
    if alpha == 0.0:
        return -math.inf
    return math.log(alpha / sigma)


def _step(x: Tensor, t: tuple, s: tuple, lams: list[float], x0s: list[Tensor], eta: float, generator) -> Tensor:
    """One exponential-integrator step from ``t = (alpha, sigma)`` to ``s`` through the nodes
    ``(lams, x0s)``, newest (lambda_t) first."""
    (a_t, s_t), (a_s, s_s) = t, s
    lam_t = _lam(a_t, s_t)
    h = _lam(a_s, s_s) - lam_t
    if not math.isfinite(h):  # into the data or out of pure noise: one node, exact as h -> inf
        lams, x0s = lams[:1], x0s[:1]
    v = [(lam - lam_t) / h if math.isfinite(h) else 0.0 for lam in lams]
    w = weights((1 + eta) * h, v)
    decay = math.exp(-eta * h) if eta else 1.0
    x_next = (s_s / s_t) * decay * x + a_s * sum(wj * x0 for wj, x0 in zip(w, x0s))
    if eta and s_s > 0:
        x_next = x_next + s_s * math.sqrt(-math.expm1(-2 * eta * h)) * randn(x.shape, generator, x.device, x.dtype)
    return x_next


@torch.no_grad()
def multistep(denoise, schedule, x: Tensor, ts: Tensor, generator=None, order: int = 2, eta: float = 0.0,
              corrector: bool = False) -> Tensor:
    """The shared loop. Step i interpolates the last ``min(order, i + 1, steps left)`` x0_hat (a
    multistep predictor); with ``corrector`` (UniC, Zhao et al. 2023, Alg. 1, for the ODE), once x0_hat
    at the new point is known the step just taken is redone with it as one more node, at no extra call.
    Points with alpha = 0 (lambda = -inf) are never nodes: no polynomial in lambda passes through them."""
    if corrector and eta:
        raise ValueError("the UniC corrector is for the ODE (eta = 0): a redone SDE step would need its noise again")
    ab = schedule.table(ts)
    lam = [_lam(a, s) for a, s in ab]
    lams: list[float] = []  # nodes, newest first
    x0s: list[Tensor] = []
    x_prev, used = None, 0
    for i in range(len(ts) - 1):
        x0, _ = denoise(x, ts[i].item())
        if corrector and x_prev is not None and math.isfinite(lam[i]):
            x = _step(x_prev, ab[i - 1], ab[i], [lam[i]] + lams[:used], [x0] + x0s[:used], eta, generator)
        if math.isfinite(lam[i]):
            lams, x0s = [lam[i]] + lams[: order - 1], [x0] + x0s[: order - 1]
        used = min(len(lams), len(ts) - 1 - i)
        x_prev = x
        x = _step(x, ab[i], ab[i + 1], lams[:used] or [lam[i]], x0s[:used] or [x0], eta, generator)
    return x


@declare(deterministic=True)
def dpmpp(denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): the midpoint rule on the line through the last two x0_hat."""
    return multistep(denoise, schedule, x, ts, generator, order=2)


@declare(deterministic=lambda options: options["eta"] == 0)
def dpmpp_sde(denoise, schedule, x: Tensor, ts: Tensor, generator=None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, sec. 4; k-diffusion's ``sample_dpmpp_2m_sde``, midpoint):
    each step also injects ``sigma_s sqrt(1 - e^(-2 eta h))`` fresh noise; ``eta = 0`` is ``dpmpp``."""
    return multistep(denoise, schedule, x, ts, generator, order=2, eta=eta)


@declare(deterministic=True)
def dpmpp_3m(denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, sec. 3.3 and App. B): the exact phi-integral of the parabola
    through the last three x0_hat (diffusers and k-diffusion weight its curvature term by half of it)."""
    return multistep(denoise, schedule, x, ts, generator, order=3)


@declare(deterministic=True)
def unipc(denoise, schedule, x: Tensor, ts: Tensor, generator=None, order: int = 2) -> Tensor:
    """UniPC-bh2 (Zhao et al. 2023): an ``order`` predictor and the UniC corrector, which raises the
    order by one at no extra model call; diffusers' ``UniPCMultistepScheduler`` with its defaults."""
    return multistep(denoise, schedule, x, ts, generator, order=order, corrector=True)


# Adams-Bashforth coefficients for equal steps, newest first (Zhang & Chen 2023, iPNDM).
_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


@declare(deterministic=True)
@torch.no_grad()
def ipndm(denoise, schedule, x: Tensor, ts: Tensor, generator=None, order: int = 4) -> Tensor:
    """iPNDM (Zhang & Chen 2023, DEIS, App. B; Zhou et al. 2024): Adams-Bashforth on the probability-flow
    ODE ``dy/ds = noise_hat`` in ``y = x / alpha``, ``s = sigma / alpha``, with the equal-step
    coefficients whatever the grid and lower orders to start: formally second order on unequal steps,
    but robust at very few (Zhou et al. 2024, Table 1)."""
    ab = schedule.table(ts)
    noises: list[Tensor] = []
    for i in range(len(ts) - 1):
        (a_t, s_t), (a_s, s_s) = ab[i], ab[i + 1]
        x0, noise = denoise(x, ts[i].item())
        if a_t == 0.0:  # pure noise, s = inf: the DDIM step
            x = a_s * x0 + s_s * noise
            continue
        noises = [noise] + noises[: order - 1]
        slope = sum(c * n for c, n in zip(_AB[len(noises)], noises))
        x = a_s * (x / a_t) + (s_s - a_s * s_t / a_t) * slope
    return x
