"""Starting from an image instead of pure noise: SDEdit (img2img) and RePaint (inpainting).

Both run the unchanged samplers (``sampler(denoise, schedule, x, ts, generator)``) and change only what
goes in: where the grid starts, the start point, and, for inpainting, the denoiser.

- **SDEdit** (Meng et al. 2022): the image's ``x0`` is noised to ``t = strength`` with the schedule,
  ``x = alpha x0 + sigma z`` (``start``), and the sampler runs from there to 0 on the grid rescaled to
  start at ``strength`` (``from_time``): the same number of steps over ``[0, strength]`` that the grid
  spends over ``[0, 1]``.
- **RePaint** (Lugmayr et al. 2022): where the mask keeps the image, every step's ``x0_hat`` is the
  image itself and ``noise_hat`` is recomputed from the current point (``Known``); ``resample > 1`` adds
  RePaint's resampling (``repaint``).

All of it happens in the model's space ``x0`` (latent pixels for a latent model), and nothing here reads
a file or a config.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffx.noise import randn


def from_time(ts: Tensor, t_start: float) -> Tensor:
    """A grid ``ts`` (from 1 down to 0) rescaled to run from ``t_start`` down to 0: ``t_start * ts``.

    Rescaling rather than cutting keeps every step the user asked for (SDEdit discretises ``[0, t0]``
    into N steps), works for any grid, and for ``grid=uniform`` is ``grids.uniform(steps, t_max=t_start)``
    exactly; ``t_start = 1`` is the grid itself. ``t_start = 0`` is no step at all: ``[0]``."""
    return ts[-1:] if t_start <= 0 else ts * t_start


def start(schedule, x0: Tensor, z: Tensor, t: float) -> Tensor:
    """``x0`` noised to time ``t`` with the noise ``z``: ``alpha(t) x0 + sigma(t) z`` (SDEdit's start).

    At t = 1 the start is ``z`` itself, as plain sampling's: t = 1 is pure noise by convention, and a
    DDPM schedule, whose ``alpha(1)`` is small but not 0, would otherwise let a trace of the image in."""
    if t >= 1:
        return z
    (alpha, sigma), = schedule.table(torch.tensor([float(t)]))
    return alpha * x0 + sigma * z


class Known:
    """A denoiser that knows part of the answer: ``x0_hat = x0`` outside ``mask`` (RePaint, Lugmayr et al.
    2022), with ``noise_hat = (x - alpha x0_hat) / sigma`` recomputed to match, as the denoiser's own
    clipping does. ``mask``: True where the model generates, False where the image is kept; ``x0`` and
    ``mask`` broadcast against the batch.

    Why this is RePaint's replacement of the known part of ``x_t`` by the image noised to ``t``: every
    diffx sampler's step maps a constant pair ``(x0_hat, noise_hat) = (x0, z)`` at a point
    ``x_t = alpha_t x0 + sigma_t z`` to ``x_s = alpha_s x0 + sigma_s z`` (DDIM's update is that formula
    itself; Heun's correction vanishes; the exponential integrators' weights integrate a constant
    exactly; iPNDM's coefficients sum to 1). So, starting from ``alpha x0 + sigma z``, the known part of
    every point the sampler visits is the image noised to that point's time with the start noise
    (with fresh noise mixed in where a stochastic sampler adds it), and the model sees exactly RePaint's
    composite. Unlike a replacement between steps, it needs no hook inside the sampler's loop.
    """

    def __init__(self, denoise, schedule, x0: Tensor, mask: Tensor):
        self.denoise, self.schedule, self.x0, self.mask = denoise, schedule, x0, mask

    @property
    def nfe(self) -> int:
        return self.denoise.nfe

    def __call__(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        x0_hat, noise_hat = self.denoise(x, t)
        (alpha, sigma), = self.schedule.table(torch.tensor([float(t)]))
        x0_hat = torch.where(self.mask, x0_hat, self.x0.to(x0_hat.dtype))
        if sigma > 0:
            noise_hat = torch.where(self.mask, noise_hat, (x - alpha * x0_hat) / sigma)
        return x0_hat, noise_hat


@torch.no_grad()
def repaint(sampler, denoise, schedule, x: Tensor, ts: Tensor, generator=None, resample: int = 1) -> Tensor:
    """RePaint's resampling (Lugmayr et al. 2022, Alg. 1, jump length 1): each step ``t -> s`` but the last
    is taken ``resample`` times, and between tries its result is sent back to ``t`` with fresh noise by the
    forward transition ``q(x_t | x_s) = N((alpha_t / alpha_s) x_s, (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) I)``,
    so the generated part has several chances to agree with the kept part.

    The sampler runs one step at a time (a grid ``[t, s]``), so a multistep sampler starts afresh at
    every step: it takes its first-order step (DDIM). ``resample = 1`` is the sampler's plain loop."""
    if resample <= 1:
        return sampler(denoise, schedule, x, ts, generator=generator)
    ab = schedule.table(ts)
    for i in range(len(ts) - 1):
        (a_t, s_t), (a_s, s_s) = ab[i], ab[i + 1]
        tries = resample if s_s > 0 else 1  # no resampling of the step into the data (Alg. 1, t > 1)
        for k in range(tries):
            x_s = sampler(denoise, schedule, x, ts[i: i + 2], generator=generator)
            if k < tries - 1:
                r = a_t / a_s
                x = r * x_s + math.sqrt(max(s_t**2 - r**2 * s_s**2, 0.0)) * randn(x.shape, generator, x.device, x.dtype)
        x = x_s
    return x
