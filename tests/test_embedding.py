"""A fitted solver embedded into more network calls (diffx.samplers.embedding) computes the same sample,
and calibration over several budgets is monotone in NFE on the validation noises through it."""

import pytest
import torch

from diffx import grids
from diffx.errors import DiffxError
from diffx.samplers import calibration, embedding, learned, multistep
from test_calibration import SMALL, _setup


@pytest.mark.parametrize("family,schedule", [("ddpm", "linear"), ("ddpm", "cosine"), ("flow", "linear")])
@pytest.mark.parametrize("m,n", [(3, 6), (4, 7), (2, 9), (5, 5)])
def test_the_embedded_solver_gives_the_same_sample(family, schedule, m, n):
    obj, _, den = _setup(family, schedule, dim=6)
    small = learned.trace(multistep.dpmpp_3m, obj.schedule, grids.logsnr(m, obj.schedule))
    g = torch.Generator().manual_seed(1)
    small.C += 0.01 * torch.randn(small.C.shape, generator=g, dtype=torch.float64).tril()  # as if fitted
    big = embedding.embed(small, n, obj.schedule)
    assert big.steps == n and big.C.shape == (n + 1, n + 1) and bool((big.C.triu(1) == 0).all())
    assert bool((big.ts[1:] < big.ts[:-1]).all()) and bool(big.ts[-1] > 0) and big.ts[0] == small.ts[0]
    assert big.meta["embedded_from"] == m
    z = torch.randn(64, 6, generator=g, dtype=torch.float64)
    x_small, x_big = (learned.rollout(den, s.C, s.ts, z) for s in (small, big))
    torch.testing.assert_close(x_big, x_small, rtol=1e-10, atol=1e-10)


def test_the_extra_calls_query_the_ddim_step_from_the_previous_point():
    """2 calls into 4: the extra calls (1 and 3) sit mid-gap and query x_p's DDIM step to their time."""
    obj, _, den = _setup("ddpm", "linear")
    small = learned.trace(multistep.dpmpp, obj.schedule, grids.uniform(2, obj.schedule))
    big = embedding.embed(small, 4, obj.schedule)
    torch.testing.assert_close(big.ts[[0, 2]], small.ts)
    torch.testing.assert_close(big.ts[[1, 3]], torch.stack([small.ts.mean(), small.ts[1] / 2]))
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs = learned.points(den, big.C, big.ts, z)
    for i in (1, 3):
        (a_p, s_p), (a, s) = obj.schedule.table(big.ts[i - 1:i + 1])
        ddim = (s / s_p) * xs[i - 1] + (a - a_p * s / s_p) * den(xs[i - 1], big.ts[i - 1])[0]
        torch.testing.assert_close(xs[i], ddim, rtol=1e-10, atol=1e-10)


def test_fewer_calls_than_the_solver_is_a_one_line_error():
    obj, _, _ = _setup()
    small = learned.trace(multistep.dpmpp, obj.schedule, grids.uniform(5, obj.schedule))
    with pytest.raises(DiffxError, match="cannot embed a 5-call solver into 3 calls"):
        embedding.embed(small, 3, obj.schedule)


def test_calibration_is_monotone_in_nfe_on_the_validation_noises():
    obj, _, den = _setup()
    found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[3, 6], seed=0, **SMALL)
    six, three = found[6], found[3]
    val = six.scores["validation"]
    assert "smaller" in val and not val["smaller"].beats(val[six.kept]) and "smaller" not in three.scores["validation"]
    assert six.solver is three.solver if six.kept == "smaller" else six.solver.steps == 6
    # scored embedded: the same sample as the 3-call solver, so the same score on the same noises
    assert val["smaller"].rms == pytest.approx(three.scores["validation"][three.kept].rms, rel=1e-9)


def test_a_smaller_budget_that_wins_is_kept_as_its_own_solver():
    """With no fit at all (iters=0) at 3 and 6 NFE, the 6-NFE result is the 3-NFE one wherever that beats
    the best 6-NFE base on the validation noises, and then costs 3 calls."""
    obj, _, den = _setup("ddpm", "linear")
    found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[3, 6], iters=0,
                                  **{k: v for k, v in SMALL.items() if k != "iters"})
    val = found[6].scores["validation"]
    assert (found[6].kept == "smaller") == val["smaller"].beats(val["base"])
    if found[6].kept == "smaller":
        assert found[6].solver.steps == 3 and found[6].scores["holdout"]["smaller"] is not None


def test_a_named_base_gets_no_embedded_candidate():
    obj, _, den = _setup("flow", "linear")
    found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[3, 6], iters=0,
                                  choices=[("dpmpp on uniform", multistep.dpmpp, grids.uniform)],
                                  **{k: v for k, v in SMALL.items() if k != "iters"})
    assert list(found[6].candidates) == ["dpmpp on uniform"] and "smaller" not in found[6].scores["validation"]
