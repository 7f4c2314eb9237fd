"""Small tensor helpers shared by the math layer (objectives, samplers), so neither imports the other."""

from __future__ import annotations

from torch import Tensor


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample scalar multiplies a batch shaped like ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))
