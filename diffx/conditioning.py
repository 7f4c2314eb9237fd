"""The condition dict ``cond`` that every model takes, and the null condition used for guidance.

``cond`` is None (unconditional) or a dict of batch-first tensors: ``{"label": (B,)}`` where label -1
is the null label, and/or text ``{"tokens": (B, L, D), "mask": (B, L), "pooled": (B, D)}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NULL_LABEL = -1


def null_like(cond: dict | None) -> dict | None:
    """The unconditional counterpart of ``cond``: null labels, no text (all tokens masked out)."""
    if cond is None:
        return None
    # Labels become the null label; text tensors become zeros (an all-False mask: no tokens).
    return {k: torch.full_like(v, NULL_LABEL) if k == "label" else torch.zeros_like(v) for k, v in cond.items()}


def drop(cond: dict | None, p: float, generator=None) -> dict | None:
    """Replace each sample's condition by the null one with probability ``p`` (CFG training,
    Ho & Salimans 2022)."""
    if cond is None or p <= 0:
        return cond
    first = next(iter(cond.values()))
    keep = torch.rand(first.shape[0], device=first.device, generator=generator) >= p  # (B,)
    null = null_like(cond)
    return {k: torch.where(keep.view(-1, *([1] * (v.ndim - 1))), v, null[k]) for k, v in cond.items()}


def cat(a: dict, b: dict) -> dict:
    """Concatenate two condition dicts along the batch, padding text to the longer length."""
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if x.ndim >= 2 and key in ("tokens", "mask") and x.shape[1] != y.shape[1]:
            length = max(x.shape[1], y.shape[1])
            x, y = (_pad_len(v, length) for v in (x, y))
        out[key] = torch.cat([x, y])
    return out


def _pad_len(v: Tensor, length: int) -> Tensor:
    pad = length - v.shape[1]
    # F.pad pads from the last dim backwards: (B, L) -> pad L; (B, L, D) -> skip D, pad L.
    spec = (0, pad) if v.ndim == 2 else (0, 0, 0, pad)
    return F.pad(v, spec)


def from_batch(batch: dict, spec) -> dict | None:
    """The condition a batch carries: its class labels when the data has classes, else None."""
    if spec.num_classes > 0:
        return {"label": batch["label"]}
    return None
