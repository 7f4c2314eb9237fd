"""Memory layout (``model.channels_last``): the same model in NHWC order computes the same function and
gradients, and a resumed optimizer state takes its parameters' layout (the fused AdamW pairs elements
by memory position)."""

import torch

from diffx.models.unet import UNet
from diffx.resume import _match_layouts


def _pair(**kw):
    torch.manual_seed(0)
    nchw = UNet(3, 16, num_classes=3, channels=16, **kw)
    for p in nchw.parameters():  # zero-initialised layers would hide a layout mix-up
        torch.nn.init.normal_(p, std=0.05)
    nhwc = UNet(3, 16, num_classes=3, channels=16, channels_last=True, **kw)
    nhwc.load_state_dict(nchw.state_dict())
    return nchw, nhwc


def test_channels_last_keeps_weights_nhwc_and_names():
    nchw, nhwc = _pair()
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nhwc.conv_in.weight.is_contiguous()
    assert list(nchw.state_dict()) == list(nhwc.state_dict())


def test_channels_last_same_output_and_gradients():
    nchw, nhwc = _pair()
    x, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    cond = {"label": torch.tensor([0, 2, -1])}
    outs = [m(x, t, cond) for m in (nchw, nhwc)]
    assert outs[1].is_contiguous()  # returned in the usual NCHW order
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for out in outs:
        (out ** 2).mean().backward()
    for (name, a), b in zip(nchw.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def _adamw_after(param, grads, state=None):
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    if state is not None:
        opt.load_state_dict(state)
        _match_layouts(opt)
    for g in grads:
        param.grad = g.contiguous(memory_format=torch.channels_last) if not param.is_contiguous() else g.clone()
        opt.step()
    return opt


def test_resumed_optimizer_state_takes_the_parameter_layout():
    torch.manual_seed(1)
    w, g1, g2 = (torch.randn(8, 4, 3, 3) for _ in range(3))
    straight = torch.nn.Parameter(w.clone())
    _adamw_after(straight, [g1, g2])
    # First step in NCHW, saved; resumed into an NHWC parameter for the second.
    first = torch.nn.Parameter(w.clone())
    state = _adamw_after(first, [g1]).state_dict()
    resumed = torch.nn.Parameter(first.detach().clone().contiguous(memory_format=torch.channels_last))
    opt = _adamw_after(resumed, [g2], state)
    assert opt.state[resumed]["exp_avg"].stride() == resumed.stride()
    torch.testing.assert_close(resumed.detach(), straight.detach(), atol=1e-6, rtol=1e-6)
