"""The options of the one CFG function: rescale (Lin et al. 2024) and the guidance interval
(Kynkaanniemi et al. 2024), as properties against plain CFG."""

import pytest
import torch

from conftest import make_objective
from diffx.errors import DiffxError
from diffx.samplers import make_denoiser


class _Affine(torch.nn.Module):
    """pred = a(label) x + b(label) t: conditional and unconditional outputs differ in scale and offset.
    Counts forwards and the rows it was given."""

    def __init__(self):
        super().__init__()
        self.calls, self.rows = 0, 0

    def forward(self, x, t, cond):
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        label = cond["label"].to(x.dtype).view(-1, 1, 1, 1)
        return x * (label + 2) + (label + 1) * 0.3 * t.view(-1, 1, 1, 1)


COND = {"label": torch.tensor([0, 1, 2, 3])}


def _call(model, t=0.5, **options):
    obj = make_objective("ddpm", "linear", prediction="v")
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    den = make_denoiser(model, obj, COND, cfg_scale=4.0, **options)
    return den(x, t), den, x, obj


def test_rescale_zero_and_an_interval_over_all_times_are_plain_cfg_exactly():
    plain, *_ = _call(_Affine())
    for options in [dict(rescale=0.0), dict(interval=(0.0, 1.0)), dict(rescale=0.0, interval=[0, 1])]:
        out, *_ = _call(_Affine(), **options)
        for a, b in zip(out, plain):
            assert torch.equal(a, b)


def test_rescale_one_matches_the_conditional_std_per_sample():
    """phi = 1: the guided network output has exactly the conditional output's per-sample std (eq. 15)."""
    model = _Affine()
    (x0, _), den, x, obj = _call(model, rescale=1.0)
    tb = torch.full((4,), 0.5)
    pred_c, pred_u = model(x, tb, COND), model(x, tb, {"label": torch.full((4,), -1)})
    cfg = pred_u + 4.0 * (pred_c - pred_u)
    expect = cfg * pred_c.std(dim=(1, 2, 3), keepdim=True) / cfg.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x0, obj.to_x0_noise(expect, x, tb)[0])
    assert not torch.allclose(x0, obj.to_x0_noise(cfg, x, tb)[0])  # the rescale did something


def test_rescale_interpolates_linearly_in_phi():
    """eq. 16: the output is phi * rescaled + (1 - phi) * cfg; the objective's inverse is affine, so x0_hat is too."""
    (a, _), *_ = _call(_Affine(), rescale=0.0)
    (b, _), *_ = _call(_Affine(), rescale=1.0)
    (mid, _), *_ = _call(_Affine(), rescale=0.3)
    torch.testing.assert_close(mid, 0.3 * b + 0.7 * a)


@pytest.mark.parametrize("t", [0.05, 0.95])
def test_outside_the_interval_is_the_conditional_prediction_in_one_half_size_call(t):
    model = _Affine()
    (x0, noise), den, x, obj = _call(model, t=t, interval=(0.2, 0.8), rescale=0.7)
    cond_only = make_denoiser(_Affine(), obj, COND)(x, t)
    assert torch.equal(x0, cond_only[0]) and torch.equal(noise, cond_only[1])
    assert den.nfe == 1 and model.calls == 1 and model.rows == 4  # no unconditional half


def test_inside_the_interval_is_guided():
    model = _Affine()
    out, *_ = _call(model, t=0.5, interval=(0.2, 0.8))
    plain, *_ = _call(_Affine(), t=0.5)
    assert torch.equal(out[0], plain[0]) and model.rows == 8


@pytest.mark.parametrize("options,key", [(dict(rescale=1.5), "guidance.rescale"), (dict(rescale="x"), "guidance.rescale"),
                                         (dict(interval=(0.8, 0.2)), "guidance.interval"),
                                         (dict(interval=(0.1,)), "guidance.interval")])
def test_bad_options_are_one_line_errors_naming_the_key(options, key):
    with pytest.raises(DiffxError, match=key.replace(".", "\\.")) as e:
        _call(_Affine(), **options)
    assert len(str(e.value).splitlines()) == 1
