"""The UNet's Upsample (``diffx.models.upsample``): one 2x2 convolution on the low-resolution map and an
interleave of its four phases must be nearest 2x upsampling followed by the 3x3 convolution, in value and
in every gradient, in both memory orders, at even and odd sizes and with a batch of one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffx.models import upsample
from diffx.models.upsample import Upsample

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def reference(layer: Upsample, x: torch.Tensor) -> torch.Tensor:
    return layer.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def build(ch: int, layout: str, gen: torch.Generator, dtype=torch.float64) -> Upsample:
    layer = Upsample(ch).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return layer.to(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 3, 7), (3, 2, 1, 1)])
def test_upsample_is_nearest_then_3x3_conv_in_value_and_gradients(layout, shape):
    gen = torch.Generator().manual_seed(0)
    layer = build(shape[1], layout, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    x.requires_grad_()
    ours, ref = layer(x), reference(layer, x)
    assert ours.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours.is_contiguous(memory_format=LAYOUTS[layout])  # the next conv gets the layout it expects
    dy = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    params = (x, layer.conv.weight, layer.conv.bias)
    for got, want in zip(torch.autograd.grad(ours, params, dy), torch.autograd.grad(ref, params, dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interleave_gradcheck(layout):
    """The written-out backward of the phase interleave, including the rows and columns no phase reads."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 8, 4, 3, generator=gen, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    assert torch.autograd.gradcheck(upsample._Interleave.apply, (z.requires_grad_(),))


def test_phase_kernels_sum_the_taps_each_phase_sees():
    """Phase (a, b)'s 2x2 kernel, written out for one output pixel: e.g. phase (0, 0) reads input rows
    (i-1, i) with row taps (w0, w1 + w2)."""
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # w[p, q] = 3p + q
    k = upsample._phase_kernels(w).reshape(2, 2, 2, 2)  # (a, b, u, v)
    rows = {0: [[0], [1, 2]], 1: [[0, 1], [2]]}  # the 3x3 taps each of a phase's two taps sums
    for a in (0, 1):
        for b in (0, 1):
            for u in (0, 1):
                for v in (0, 1):
                    want = sum(3 * p + q for p in rows[a][u] for q in rows[b][v])
                    assert k[a, b, u, v].item() == want


def test_upsample_under_bf16_autocast_stays_close_to_the_reference():
    gen = torch.Generator().manual_seed(2)
    layer = build(8, "nhwc", gen, torch.float32)
    x = torch.randn(2, 8, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = layer(x), reference(layer, x)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=0.05 * ref.abs().max().item())


def test_upsample_keeps_the_3x3_weights_and_their_names():
    """Checkpoints are unchanged: the layer's parameters are the 3x3 conv's, as before."""
    names = {n: tuple(p.shape) for n, p in Upsample(4).named_parameters()}
    assert names == {"conv.weight": (4, 4, 3, 3), "conv.bias": (4,)}
