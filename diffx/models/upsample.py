"""The UNet's upsampling layer: nearest-neighbour 2x, then a 3x3 convolution (DDPM, Ho et al. 2020;
it avoids the checkerboards of a transposed convolution, Odena et al. 2016), computed as one 2x2
convolution on the low-resolution map.

After a nearest 2x upsampling every output pixel (2i+a, 2j+b), phase (a, b) in {0, 1}^2, sees only a
2x2 window of the input: along a row the 3x3 kernel's taps (w0, w1, w2) fall on input rows
(i-1, i, i) for a = 0 and (i, i, i+1) for a = 1, so they act as the two taps (w0, w1 + w2) and
(w0 + w1, w2). The four phases' 2x2 kernels, stacked as 4C output channels, convolve the input once
(padding 1: (H+1) x (W+1) outputs; phase (a, b) is the window starting at (a, b)), and interleaving
the phases gives the 2H x 2W map: the same function to float round-off (the summed taps), with
16 multiply-adds per input pixel and channel pair instead of 36 (the "sub-pixel" view of a resize-
convolution, Shi et al. 2016; Aitken et al. 2017). The weights stay the 3x3 kernel, so checkpoints
are unchanged. Measured: README, "Training speed against diffusers"; ``tests/test_upsample.py`` checks
the output and the gradients against ``F.interpolate`` and ``F.conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3x3 conv (its weights: ``self.conv``)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        w, bias = self.conv.weight, self.conv.bias  # (C, Cin, 3, 3), (C,)
        k = _phase_kernels(w)  # (4C, Cin, 2, 2), phases (a, b) major
        if _nhwc(w):  # the model's memory order (UNet channels_last), which the conv's output then takes
            k = k.contiguous(memory_format=torch.channels_last)
        z = F.conv2d(x, k, bias.repeat(4), padding=1)  # (B, 4C, H+1, W+1)
        return _Interleave.apply(z)  # (B, C, 2H, 2W), in z's memory order

    def reference(self, x: Tensor) -> Tensor:
        """The textbook computation of the same function, 2.25x the multiply-adds (benchmarks compare with it)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _phase_kernels(w: Tensor) -> Tensor:
    """3x3 kernels (C, Cin, 3, 3) -> the four phases' 2x2 kernels (4C, Cin, 2, 2), (a, b) major.
    Sums of weights, not a matmul, so autocast leaves them in the weights' precision."""
    rows = _collapse(w, 2)  # (2 [a], C, Cin, 2, 3)
    k = _collapse(rows, 4)  # (2 [b], 2 [a], C, Cin, 2, 2)
    return k.transpose(0, 1).flatten(0, 2)


def _collapse(w: Tensor, dim: int) -> Tensor:
    """Three taps (w0, w1, w2) along ``dim`` -> phase 0's (w0, w1 + w2) and phase 1's (w0 + w1, w2),
    stacked on a new leading dim."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)])


def _nhwc(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _Interleave(torch.autograd.Function):
    """z (B, 4C, H+1, W+1), phases (a, b) major -> y (B, C, 2H, 2W) in z's memory order, with
    y[..., 2i+a, 2j+b] = z_ab[..., i+a, j+b].

    One copy each way. Autograd's own backward of four slice assignments zero-fills the whole gradient
    once per slice: on a CPU that cost more than the smaller convolution saves."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        B, C4, H1, W1 = z.shape
        y = torch.empty(B, C4 // 4, 2 * (H1 - 1), 2 * (W1 - 1), dtype=z.dtype, device=z.device,
                        memory_format=torch.channels_last if _nhwc(z) else torch.contiguous_format)
        for (a, b), window in _windows(z).items():
            y[:, :, a::2, b::2].copy_(window)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> Tensor:
        B, C, H2, W2 = gy.shape
        H, W = H2 // 2, W2 // 2
        gz = torch.empty(B, 4 * C, H + 1, W + 1, dtype=gy.dtype, device=gy.device,
                         memory_format=torch.channels_last if _nhwc(gy) else torch.contiguous_format)
        g6 = gz.unflatten(1, (2, 2, C))  # (B, a, b, C, H+1, W+1)
        for (a, b), window in _windows(gz).items():
            g6[:, a, b, :, H if a == 0 else 0].zero_()  # the row and the column the phase's window leaves out
            g6[:, a, b, :, :, W if b == 0 else 0].zero_()
            window.copy_(gy[:, :, a::2, b::2])
        return gz


def _windows(z: Tensor) -> dict[tuple[int, int], Tensor]:
    """z (B, 4C, H+1, W+1) -> each phase (a, b)'s window z_ab[..., a:a+H, b:b+W], a (B, C, H, W) view."""
    _, C4, H1, W1 = z.shape
    z6 = z.unflatten(1, (2, 2, C4 // 4))  # (B, a, b, C, H+1, W+1)
    return {(a, b): z6[:, a, b, :, a:a + H1 - 1, b:b + W1 - 1] for a in (0, 1) for b in (0, 1)}
