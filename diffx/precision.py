"""The network's precision when drawing images (``precision=fp32|bf16`` of ``diffx sample``, ``eval`` and
``interpolate``).

``bf16`` runs every network call under ``torch.autocast`` in bfloat16 (Kalamkar et al. 2019), as
``train.mixed_precision=bf16`` trains: matmuls and convolutions in bf16, norms and softmax as autocast
keeps them, the weights themselves untouched. The network's output goes back to the sampler in the
state's dtype, so the solver's updates, the guidance arithmetic and the clipping stay float32. On a GPU,
and on a CPU with AMX (``grep -c amx_bf16 /proc/cpuinfo``), the network is then several times faster
(README, "Mixed precision"); a CPU without AMX emulates bf16 and can be slower than float32.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from diffx.build import Parts
from diffx.errors import DiffxError
from diffx.generate import takes_guidance

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def check(precision: str) -> None:
    """A one-line error for anything but the precisions above."""
    if precision not in DTYPES:
        raise DiffxError(f"precision={precision!r}: expected one of {', '.join(DTYPES)}")


def apply(parts: Parts, precision: str, device: torch.device) -> Parts:
    """``parts`` with its network run at ``precision`` (unchanged for fp32)."""
    check(precision)
    dtype = DTYPES[precision]
    return parts if dtype is None else dataclasses.replace(parts, model=Autocast(parts.model, device.type, dtype))


class Autocast(nn.Module):
    """``model(x, t, cond)`` under ``torch.autocast(device_type, dtype)``, its output in x's dtype.

    ``guidance_embed`` says whether the model inside takes the guidance scale as an input (a guided
    student, ``diffx.generate.takes_guidance``)."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.inner, self.device_type, self.dtype = model, device_type, dtype
        self.guidance_embed = takes_guidance(model)

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(x, t, cond).to(x.dtype)
