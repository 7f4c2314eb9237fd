"""Time grids for sampling: decreasing 1-D float64 tensors from the start time down to t = 0.

Each grid is ``grid(steps, schedule) -> ts`` with ``len(ts) == steps + 1`` and ``ts[-1] == 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flow_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def uniform(steps: int, schedule=None, t_max: float = 1.0, shift: float = 1.0) -> Tensor:
    """Uniform in t, starting at ``t_max`` ("trailing" spacing, Lin et al. 2024, so that the first step
    starts from pure noise), optionally shifted."""
    ts = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    return flow_shift(ts, shift)
