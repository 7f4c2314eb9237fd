"""Single-step samplers: each step uses the model's prediction at the current point only (Heun: and
at the next), with no memory of earlier steps. All share the signature
``sampler(denoise, schedule, x, ts, generator=None, **options)`` and return the clean sample;
``ts`` is a decreasing grid from the start time to 0 (diffx/grids.py), queried at exactly those times.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffx.noise import randn
from diffx.samplers import multistep
from diffx.samplers.denoiser import Denoise
from diffx.samplers.plan import declare


@declare(deterministic=lambda options: options["eta"] == 0)
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


@declare(deterministic=False)
def ddpm(denoise: Denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """Ancestral sampling from the posterior ``q(x_s | x_t, x0_hat)`` (Ho et al. 2020, Alg. 2)."""
    return ddim(denoise, schedule, x, ts, generator, eta=1.0)


@declare(deterministic=True)
def euler(denoise: Denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """Euler on the probability-flow ODE ``dy/ds = noise_hat`` in ``y = x / alpha, s = sigma / alpha``
    (Karras et al. 2022, Alg. 1 without the correction; k-diffusion's ``sample_euler``).

    Written back in x this is ``x <- alpha_s x0_hat + sigma_s noise_hat``, which stays finite where
    alpha = 0 (the pure-noise end of the flow path). It coincides with deterministic DDIM, and on
    the rectified-flow path with Euler in t on the velocity.
    """
    return ddim(denoise, schedule, x, ts, generator, eta=0.0)


@declare(deterministic=True)
@torch.no_grad()
def heun(denoise: Denoise, schedule, x: Tensor, ts: Tensor, generator=None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1): the Euler (DDIM) step predicts the next
    point, the model is called there, and the step is redone with the trapezoid of the two predictions.

    Alg. 1's trapezoid is on noise_hat in ``s = sigma / alpha``; written on the two x0_hat it weights the
    new one by ``(e^h - 1) / 2``, with ``h = lambda_s - lambda_t`` the step in ``lambda = log(alpha / sigma)``.
    Above h = log 3 that weight exceeds 1 and the step extrapolates: out of pure noise (h = 5 - 10 on
    DDPM schedules, inf on the flow path) it diverged (RMS 1e1 - 1e3 at 5 NFE). Such steps take the
    trapezoid in the exponential-integrator form instead, ``x_s = (sigma_s / sigma_t) x_t + alpha_s
    int_0^h e^-(u - h) x0(u) du`` over the line through the two x0_hat (ETDRK2, Cox & Matthews 2002; the
    data-prediction integral of DPM-Solver++, Lu et al. 2022, eq. 9), whose weights lie in [0, 1] for every
    h and reach the exact limit at alpha = 0. Both are 2nd order; Alg. 1's is kept where it is stable, as
    it is the more accurate on a uniform grid's large lambda-steps near pure noise. Two calls per step;
    the last step into t = 0 takes the Euler step, as Alg. 1 does.
    """
    ab = schedule.table(ts)
    for i in range(len(ts) - 1):
        (a_t, s_t), (a_s, s_s) = ab[i], ab[i + 1]
        x0, noise = denoise(x, ts[i].item())
        x_next = a_s * x0 + s_s * noise
        if s_s > 0:
            x0_next, noise_next = denoise(x_next, ts[i + 1].item())
            h = math.log(a_s / s_s) - (math.log(a_t / s_t) if a_t > 0 else -math.inf)
            if h <= math.log(3):  # Alg. 1: y_s = y_t + (s_s - s_t) (eps_t + eps_s) / 2, times alpha_s
                x_next = x_next + (s_s - a_s * s_t / a_t) * (noise_next - noise) / 2
            else:
                w_t, w_s = trapezoid(h)
                x_next = (s_s / s_t) * x + a_s * (w_t * x0 + w_s * x0_next)
        x = x_next
    return x


def trapezoid(h: float) -> tuple[float, float]:
    """``(w_t, w_s)`` with ``int_0^h e^-(h-u) p(u) du = w_t p(0) + w_s p(h)`` for the line p:
    ``w_s = 1 - (1 - e^-h) / h`` and ``w_t = (1 - e^-h) - w_s``; -> (0, 1) as h -> inf and
    (h/2, h/2) as h -> 0, the plain trapezoid."""
    m0, m1 = (multistep.phi_moment(h, k) for k in (0, 1))
    return m0 - m1, m1
