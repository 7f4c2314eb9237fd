"""Per-image Gaussian noise: image i depends on its own seed only, whatever the batch it is in."""

from __future__ import annotations

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
