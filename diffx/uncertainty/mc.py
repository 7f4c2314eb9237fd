"""The Monte-Carlo reference: draw the head's weights from the posterior and look at the spread.

Kept only as what the closed form (``predictive``) and the propagation (``propagate``) are checked and
benchmarked against: BayesDiff's ``link_approx="mc", n_samples=100`` on one prediction (``head_moments``),
and whole sampling runs with one weight draw per run, shared by every step and by both guidance
branches (``run_moments``). Variances are the unbiased sample variances over the draws.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from diffx.generate import denoiser
from diffx.uncertainty.laplace import Posterior, head_params


def _split(head: nn.Module, theta: Tensor) -> dict:
    """(outputs, K+1) -> the head's ``weight`` and ``bias``."""
    return {"weight": theta[:, :-1].reshape(head.weight.shape), "bias": theta[:, -1]}


def draws(posterior: Posterior, head: nn.Module, n: int, generator=None) -> Tensor:
    """``n`` weight settings of the head (n, outputs, K+1): the model's own plus a posterior draw each."""
    theta = head_params(head).to(posterior.cov.dtype)
    return (theta + posterior.sample(n, theta.shape[0], generator)).to(head.weight.dtype)


def head_moments(posterior: Posterior, head: nn.Module, g: Tensor, n: int, generator=None) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``head(g)`` over ``n`` posterior draws (the head's output layout)."""
    thetas = draws(posterior, head, n, generator).to(g.dtype)
    ys = torch.stack([functional_call(head, _split(head, th), (g,)) for th in thetas])  # (n, B, ...)
    return ys.mean(0), ys.var(0)


class DrawnHeads(nn.Module):
    """The model with a different head weight setting per block of rows: rows ``r`` use draw
    ``(r mod (S * B)) // B``, so a batch of S draws x B images -- and its guided double -- pairs every
    image with every draw. ``forward(x, t, cond) -> like x``, a model for ``diffx.generate.denoiser``."""

    def __init__(self, model, thetas: Tensor, images: int):
        super().__init__()
        self.model, self.thetas, self.images = model, thetas, images

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        f = self.model.features(x, t, cond)
        head, s = self.model.head, self.thetas.shape[0]
        idx = (torch.arange(x.shape[0], device=x.device) % (s * self.images)) // self.images
        theta = self.thetas.to(device=f.device, dtype=f.dtype)[idx]  # (R, outputs, K+1)

        def one(th, fr):
            return functional_call(head, _split(head, th), (fr[None],))[0]

        return self.model.to_image(vmap(one)(theta, f))


def run_moments(parts, plan, inputs: list, negatives, scale: float, z: Tensor, posterior: Posterior, n: int,
                chunk: int = 16, generator=None) -> tuple[Tensor, Tensor]:
    """Mean and variance of the sample over ``n`` whole sampling runs from the noises ``z`` (B, C, H, W),
    one weight draw per run (``chunk`` draws batched at a time)."""

    head, b = parts.model.head, z.shape[0]
    thetas = draws(posterior, head, n, generator)
    samples = []
    for lo in range(0, n, chunk):
        th = thetas[lo:lo + chunk]
        s = th.shape[0]
        drawn = replace(parts, model=DrawnHeads(parts.model, th, b))
        denoise = denoiser(drawn, list(inputs) * s, None if negatives is None else list(negatives) * s, scale,
                           z.device)
        x = plan(denoise, parts.objective.schedule, z.repeat(s, 1, 1, 1))
        samples.append(x.reshape(s, b, *x.shape[1:]))
    xs = torch.cat(samples)  # (n, B, C, H, W)
    return xs.mean(0), xs.var(0)
