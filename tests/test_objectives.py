"""Objectives: the target inverts back to (x0, noise); the loss is per-sample; weights are right."""

import pytest
import torch

from conftest import make_objective
from diffx.tensors import bcast

CASES = [("ddpm", s, p) for s in ("linear", "cosine") for p in ("eps", "v", "x0")] + \
        [("flow", s, None) for s in ("linear", "cosine")]


def _kwargs(p):
    return {} if p is None else {"prediction": p}


@pytest.mark.parametrize("family,schedule,prediction", CASES)
def test_round_trip(family, schedule, prediction):
    obj = make_objective(family, schedule, **_kwargs(prediction))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.96 + 0.02
    a, s = obj.schedule.alpha_sigma(t)
    xt = bcast(a, x0) * x0 + bcast(s, x0) * noise
    x0_hat, noise_hat = obj.to_x0_noise(obj.target(x0, noise, t), xt, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(noise_hat, noise)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_flow_target_is_the_path_velocity(schedule):
    obj = make_objective("flow", schedule)
    x0, noise = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64).requires_grad_(True)
    a, s = obj.schedule.alpha_sigma(t)
    xt = a[:, None] * x0 + s[:, None] * noise
    v_auto = torch.stack([torch.autograd.grad(xt[:, j].sum(), t, retain_graph=True)[0] for j in range(2)], 1)
    torch.testing.assert_close(obj.target(x0, noise, t.detach()), v_auto)


@pytest.mark.parametrize("family,schedule,prediction", CASES)
def test_loss_is_per_sample_and_zero_for_a_perfect_model(family, schedule, prediction):
    obj = make_objective(family, schedule, **_kwargs(prediction))
    x0 = torch.randn(16, 1, 2, 2)
    seen = {}

    def oracle(xt, t, cond):  # knows x0, so it can return the exact target
        a, s = obj.schedule.alpha_sigma(t)
        noise = (xt - bcast(a, x0) * x0) / bcast(s, x0)
        seen["t"] = t
        return obj.target(x0, noise, t)

    loss = obj.loss(oracle, x0)
    assert loss.shape == (16,)
    assert loss.abs().max() < 1e-6
    lo, hi = obj.t_range
    assert seen["t"].min() >= lo and seen["t"].max() <= hi


def test_ddpm_t_is_snapped_to_discrete_steps():
    obj = make_objective("ddpm", "linear")
    t = obj.sample_t(1000)
    k = t * 1000
    torch.testing.assert_close(k, k.round())
    assert k.min() >= 1 and k.max() <= 1000


def test_min_snr_weights():
    """Min-SNR-gamma (Hang et al. 2023): eps weight min(snr, g)/snr, v weight min(snr, g)/(snr+1)."""
    t = torch.tensor([0.05, 0.5, 0.95])
    for p, expect in [("eps", lambda snr: torch.clamp(snr, max=5) / snr),
                      ("v", lambda snr: torch.clamp(snr, max=5) / (snr + 1))]:
        obj = make_objective("ddpm", "cosine", prediction=p, weighting="min_snr", min_snr_gamma=5.0)
        a, s = obj.schedule.alpha_sigma(t)
        torch.testing.assert_close(obj.weight(t), expect((a / s) ** 2))
    assert torch.all(make_objective("ddpm", "cosine").weight(t) == 1)


def test_bad_prediction_is_a_clear_error():
    from diffx.errors import DiffxError

    with pytest.raises(DiffxError, match="objective.prediction"):
        make_objective("ddpm", "linear", prediction="score")


# ------------------------------------------------------------------------------------ time sampling
from diffx import time_sampling  # noqa: E402


@pytest.mark.parametrize("name", ["uniform", "logit_normal", "mode", "gaussian"])
def test_t_samplers_stay_inside_the_path(name):
    u = getattr(time_sampling, name)(20000, generator=torch.Generator().manual_seed(0))
    assert u.shape == (20000,) and u.dtype == torch.float32
    assert u.min() > 0 and u.max() < 1


def test_t_sampler_shapes():
    g = torch.Generator().manual_seed(0)
    assert time_sampling.uniform(20000, generator=g).mean().item() == pytest.approx(0.5, abs=0.01)
    # logit-normal: symmetric about loc, concentrated in the middle (SD3 eq. 19)
    ln = time_sampling.logit_normal(20000, generator=g, loc=0.0, scale=1.0)
    assert ln.median().item() == pytest.approx(0.5, abs=0.01)
    assert ((ln > 0.25) & (ln < 0.75)).float().mean() > 0.65
    assert time_sampling.logit_normal(20000, generator=g, loc=1.0).median().item() == pytest.approx(
        torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    # mode with s = 0 is uniform; s > 0 moves mass to the middle (SD3 eq. 20)
    flat = time_sampling.mode(20000, generator=g, s=0.0)
    assert ((flat > 0.4) & (flat < 0.6)).float().mean().item() == pytest.approx(0.2, abs=0.015)
    peaked = time_sampling.mode(20000, generator=g, s=1.29)
    assert ((peaked > 0.4) & (peaked < 0.6)).float().mean() > 0.25
    # truncated Gaussian: centred on loc with the requested spread
    gs = time_sampling.gaussian(20000, generator=g, loc=0.5, scale=0.1)
    assert gs.mean().item() == pytest.approx(0.5, abs=0.01) and gs.std().item() == pytest.approx(0.1, rel=0.05)


def test_ddpm_gaussian_t_emphasises_the_middle_steps():
    from diffx.objectives import DDPM
    from diffx.schedules import ddpm_cosine

    obj = DDPM(ddpm_cosine(), lambda n, device=None, generator=None: time_sampling.gaussian(
        n, device, generator, loc=0.5, scale=0.1))
    k = obj.sample_t(20000) * 1000
    torch.testing.assert_close(k, k.round())
    assert ((k > 300) & (k <= 700)).float().mean() > 0.9


def test_flow_shift_moves_training_t_toward_noise():
    from diffx.objectives import Flow
    from diffx.schedules import FlowLinear

    plain = Flow(FlowLinear(), time_sampling.uniform).sample_t(20000, generator=torch.Generator().manual_seed(0))
    obj = Flow(FlowLinear(), time_sampling.uniform, shift=3.0)
    shifted = obj.sample_t(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, time_sampling.flow_shift(plain, 3.0))
    assert shifted.mean() > plain.mean() + 0.1
    # the SNR at shifted t is the SNR at t divided by shift^2 (SD3 eq. 23 on the rectified-flow path)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    snr = lambda t: ((1 - t) / t) ** 2  # noqa: E731
    torch.testing.assert_close(snr(time_sampling.flow_shift(t, 3.0)), snr(t) / 9)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_is_the_same_x0_space_weight_for_every_prediction(prediction):
    """w(t) * |pred error|^2 equals min(SNR, gamma) * |x0 error|^2 whatever the prediction (Hang et al. 2023)."""
    obj = make_objective("ddpm", "cosine", prediction=prediction, weighting="min_snr", min_snr_gamma=5.0)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    x0, noise = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    a, s = obj.schedule.alpha_sigma(t)
    xt = a[:, None] * x0 + s[:, None] * noise
    x0_hat = x0 + 0.1  # any error in x0, and the matching prediction
    pred = obj.target(x0_hat, (xt - a[:, None] * x0_hat) / s[:, None], t)
    weighted = obj.weight(t) * ((pred - obj.target(x0, noise, t)) ** 2).sum(1)
    snr = (a / s) ** 2
    torch.testing.assert_close(weighted, torch.clamp(snr, max=5.0) * ((x0_hat - x0) ** 2).sum(1))


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_loss_kinds(loss):
    obj = make_objective("flow", "linear", loss=loss)
    x0 = torch.randn(8, 1, 2, 2)
    out = obj.loss(lambda xt, t, c: torch.zeros_like(xt) + 1.0, x0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8,) and torch.all(out > 0)
