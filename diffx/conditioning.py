"""The condition dict ``cond`` that every model takes, where it comes from, and its null counterpart.

``cond`` is None (unconditional) or a dict of batch-first tensors: ``{"label": (B,)}`` where label -1
is the null label, or a text encoder's features (diffx/text.py), which the model's text head turns
into ``{"tokens": (B, L, D), "mask": (B, L), "pooled": (B, D)}``.

A condition source (``Unconditional``, ``Labels``, ``Text``; ``of`` picks one from what the data and
the config provide) turns a data batch or user inputs into ``cond`` and says what the null condition
is. One convention serves training-time dropout and sampling-time guidance alike (Ho & Salimans
2022): the null label is -1, and the null text is **the encoding of the empty prompt**, which a
``negative_prompt`` replaces at sampling time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffx.models.conditioned import TextConditioned
from diffx.progress import work

NULL_LABEL = -1


class Unconditional:
    """No condition: ``cond`` is always None."""

    model_kwargs: dict = {}
    description = "unconditional"

    def __call__(self, batch: dict, device=None) -> None:
        return None

    def encode(self, inputs: list, device=None) -> None:
        return None

    def null(self, n: int, device=None) -> None:
        return None

    def wrap(self, net):
        return net

    def prepare(self, captions: list[str], device=None) -> None:
        """Do any one-off encoding of the training data's conditions before the loop starts."""


class Labels(Unconditional):
    """Class labels ``{"label": (B,)}``; the null condition is the label -1."""

    def __init__(self, num_classes: int):
        self.model_kwargs = {"num_classes": num_classes}
        self.description = f"{num_classes} class labels"

    def __call__(self, batch: dict, device=None) -> dict:
        return {"label": torch.as_tensor(batch["label"], device=device)}

    def encode(self, inputs: list[int], device=None) -> dict:
        return {"label": torch.tensor(list(inputs), dtype=torch.long, device=device)}

    def null(self, n: int, device=None) -> dict:
        return self.encode([NULL_LABEL] * n, device)


class Text(Unconditional):
    """Captions or prompts through a text encoder; the null condition is the empty prompt's encoding.

    The encoder's frozen stage runs once per distinct prompt: its rows are kept in a table, so a
    batch is a gather (the shapes data has a few hundred distinct captions, seen thousands of times).
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.model_kwargs = {"text_dim": encoder.dim, "pooled_dim": encoder.pooled_dim}
        self.description = f"text ({type(encoder).__name__} encoder)"
        self.rows: dict[str, int] = {}
        self.table: dict[str, Tensor] = {}

    def __call__(self, batch: dict, device=None) -> dict:
        return self.encode(batch["caption"], device)

    def encode(self, prompts: list[str], device=None) -> dict:
        new = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if new:
            features = self.encoder.features(new, device)
            self.rows.update({p: len(self.rows) + i for i, p in enumerate(new)})
            self.table = {k: torch.cat([self.table[k].to(v.device), v]) if k in self.table else v
                          for k, v in features.items()}
        index = torch.tensor([self.rows[p] for p in prompts])
        return {k: v[index.to(v.device)].to(device) for k, v in self.table.items()}

    def null(self, n: int, device=None) -> dict:
        return self.encode([""] * n, device)

    def wrap(self, net):
        return TextConditioned(net, self.encoder.head())

    def prepare(self, captions: list[str], device=None, chunk: int = 256) -> None:
        """Encode every distinct caption once, up front and with a progress line, instead of
        spread over the first training steps."""
        new = [p for p in dict.fromkeys(captions) if p not in self.rows]
        with work(f"encoding {len(new)} distinct captions", len(new)) as advance:
            for lo in range(0, len(new), chunk):
                self.encode(new[lo: lo + chunk], device)
                advance(len(new[lo: lo + chunk]))


def of(text_encoder, spec) -> Unconditional:
    """Text when a text encoder is configured, else class labels when the data has classes, else none."""
    if text_encoder is not None:
        return Text(text_encoder)
    return Labels(spec.num_classes) if spec.num_classes > 0 else Unconditional()


def null_like(cond: dict | None) -> dict | None:
    """A structural null for ``cond``: null labels, zeroed text features. The samplers fall back to it
    when no ``uncond`` is given; text models are always given the empty prompt's encoding instead."""
    if cond is None:
        return None
    return {k: torch.full_like(v, NULL_LABEL) if k == "label" else torch.zeros_like(v) for k, v in cond.items()}


def drop(cond: dict | None, p: float, null: dict | None = None, generator=None) -> dict | None:
    """Replace each sample's condition by ``null`` (default ``null_like(cond)``) with probability
    ``p``: classifier-free guidance training (Ho & Salimans 2022)."""
    if cond is None or p <= 0:
        return cond
    first = next(iter(cond.values()))
    keep = torch.rand(first.shape[0], device=first.device, generator=generator) >= p  # (B,)
    null = null_like(cond) if null is None else null
    return {k: torch.where(keep.view(-1, *([1] * (v.ndim - 1))), v, null[k]) for k, v in cond.items()}


def cat(a: dict, b: dict) -> dict:
    """Concatenate two condition dicts along the batch, padding sequences (dim 1) to the longer one."""
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if x.ndim >= 2 and x.shape[1] != y.shape[1] and x.shape[2:] == y.shape[2:]:
            length = max(x.shape[1], y.shape[1])
            x, y = (_pad_len(v, length) for v in (x, y))
        out[key] = torch.cat([x, y])
    return out


def _pad_len(v: Tensor, length: int) -> Tensor:
    pad = length - v.shape[1]
    # F.pad pads from the last dim backwards: (B, L) -> pad L; (B, L, D) -> skip D, pad L.
    spec = (0, pad) if v.ndim == 2 else (0, 0, 0, pad)
    return F.pad(v, spec)
