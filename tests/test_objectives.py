"""Objectives: the target inverts back to (x0, noise); the loss is per-sample; weights are right."""

import pytest
import torch

from conftest import make_objective
from diffx.objectives import bcast

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
