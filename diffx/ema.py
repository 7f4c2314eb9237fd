"""Exponential moving average of the weights, the copy that is sampled from (Polyak averaging)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``theta_ema <- d theta_ema + (1 - d) theta`` with the warm-up ``d = min(decay, (1 + n) / (10 + n))``
    (the TensorFlow ExponentialMovingAverage rule), so early averages are not dominated by the random
    initial weights."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [p for p in self.model.parameters()]
        new = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema)]
        torch._foreach_lerp_(ema, new, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()
