"""A denoiser together with the trainable part of its text encoder, as one module."""

from __future__ import annotations

from torch import Tensor, nn


class TextConditioned(nn.Module):
    """``forward(x, t, features) = net(x, t, text(features))``.

    ``features`` is a text encoder's cached, frozen-stage output (diffx/text.py) and ``text`` its
    trainable head. Holding both here is what lets the head train jointly with the denoiser: one
    module for Accelerate to prepare, for EMA to average and for ``model.safetensors`` to hold, so the
    checkpoint rebuilds everything from its stored config.
    """

    def __init__(self, net: nn.Module, text: nn.Module):
        super().__init__()
        self.net, self.text = net, text

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        return self.net(x, t, self.condition(cond))

    def condition(self, cond: dict | None) -> dict | None:
        """The net's condition: the text head's output, plus the guidance scale ``w`` of a guided-distilled
        student (``diffx.distill``), which is not text and passes through."""
        if cond is None:
            return None
        return {**self.text(cond), **({"w": cond["w"]} if "w" in cond else {})}

    # The split a Bayesian last layer needs (diffx.uncertainty): the net's own.
    @property
    def head(self) -> nn.Module:
        return self.net.head

    def to_image(self, y: Tensor) -> Tensor:
        return self.net.to_image(y)

    def features(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        return self.net.features(x, t, self.condition(cond))
