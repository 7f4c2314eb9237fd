"""Per-image Gaussian noise: image i depends on its own seed only, whatever the batch it is in; and the
spherical interpolation between two such noises (``diffx interpolate``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image; CPU so the same seed gives the same image on every device."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn(shape: tuple[int, ...], generator=None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` (B, ...). ``generator`` is None, one ``torch.Generator``
    or a list of B generators (one per image, drawn on the CPU and moved to ``device``)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator]
        return torch.stack(rows).to(device=device, dtype=dtype)
    if generator is not None and generator.device.type != torch.device(device or "cpu").type:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation from ``a`` (w = 0) to ``b`` (w = 1), each a whole noise tensor taken as one
    vector (Shoemake 1985; for Gaussian latents White 2016, "Sampling generative networks", sec. 2.1):
    ``sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b``, ``theta`` the angle between them.

    Why not a straight line: two independent high-dimensional Gaussians are nearly orthogonal with
    nearly equal norms ``sqrt(d)``, and the midpoint of a line between them has norm ``sqrt(d / 2)``,
    a noise no sampler ever starts from; the arc keeps the norm (DDIM's interpolation, Song et al. 2021,
    sec. 5.3). The coefficients are exactly 1 and 0 at the ends, so w = 0 returns ``a`` itself.
    Nearly parallel inputs (sin(theta) ~ 0) fall back to the straight line, which the arc then is."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = (a64 @ b64 / (a64.norm() * b64.norm()).clamp_min(1e-300)).clamp(-1, 1).item()
    theta = math.acos(cos)
    if math.sin(theta) < 1e-6:
        return (1 - w) * a + w * b
    return (math.sin((1 - w) * theta) / math.sin(theta)) * a + (math.sin(w * theta) / math.sin(theta)) * b
