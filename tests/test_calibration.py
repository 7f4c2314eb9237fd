"""Calibration as a library call (diffx.samplers.calibration): the base is the best of all deterministic
samplers x grids, the result never loses to it on the validation noises, budgets share one reference."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_objective
from diffx.errors import DiffxError
from diffx.samplers import calibration, learned, make_denoiser
from diffx.tensors import bcast


class Mixture(torch.nn.Module):
    """An exact 'network' for a K-component Gaussian mixture in D dimensions (std c): the objective's
    target for the posterior mean; ``detach_t`` takes t through ``.item()``, as a careless model might."""

    def __init__(self, objective, dim=6, k=4, c=0.1, seed=0, detach_t=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(k, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8  # (K, D)
        self.objective, self.c2, self.detach_t, self.calls = objective, c * c, detach_t, 0

    def forward(self, x, t, cond=None):
        self.calls += len(x)
        if self.detach_t:
            t = torch.full_like(t, t[0].item())
        alpha, sigma = (bcast(v, x).to(x.dtype) for v in self.objective.schedule.alpha_sigma(t))
        var = alpha**2 * self.c2 + sigma**2  # (B, 1)
        d = x[:, None, :] - alpha[:, None] * self.mu.to(x.dtype)  # (B, K, D)
        resp = torch.softmax(-(d**2).sum(-1) / (2 * var), dim=1)  # (B, K)
        mean = resp @ self.mu.to(x.dtype)
        x0 = mean + (alpha * self.c2 / var) * (x - alpha * mean)
        return self.objective.target(x0, (x - alpha * x0) / sigma, t)


def _setup(family="ddpm", schedule="linear", **kw):
    obj = make_objective(family, schedule)
    model = Mixture(obj, **kw)
    return obj, model, make_denoiser(model, obj)


SMALL = dict(samples=128, validation=64, holdout=64, reference_steps=40, batch=64, iters=30)


def test_the_result_never_loses_to_the_best_base_and_budgets_share_one_reference(monkeypatch):
    obj, model, den = _setup()
    solved = []
    reference = learned.reference
    monkeypatch.setattr(learned, "reference", lambda d, s, z, steps: solved.append(len(z)) or reference(d, s, z, steps))
    found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[4, 6], seed=0, **SMALL)
    assert set(found) == {4, 6}
    assert sum(solved) == 256  # samples + validation + holdout, solved once for both budgets
    for nfe, result in found.items():
        val, scores = result.scores["validation"], result.candidates
        lowest = min(s.rms for s in scores.values())
        near = [s for s in scores.values() if s.rms <= calibration.NEAR * lowest]
        assert scores[result.base] == min(near, key=lambda s: (s.tail, s.mean))  # best's rule
        assert len(result.candidates) >= 15  # 7 bases x 3 grids, Heun only at odd budgets
        kept = val[result.kept]
        assert kept.mean <= val["base"].mean and kept.rms <= val["base"].rms
        assert result.solver.steps <= nfe  # fewer where the smaller budget's result was kept (tests/test_embedding.py)
        if result.kept != "smaller":
            assert (result.kept == "fit") == (val["fit"].beats(val["base"]) and result.confidence >= calibration.CONFIDENCE)


def test_a_named_base_is_the_only_candidate():
    from diffx import grids
    from diffx.samplers import multistep

    obj, _, den = _setup("flow", "linear")
    found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[5], iters=0,
                                  choices=[("dpmpp on uniform", multistep.dpmpp, grids.uniform)],
                                  **{k: v for k, v in SMALL.items() if k != "iters"})
    assert list(found[5].candidates) == ["dpmpp on uniform"] and found[5].kept == "base"
    assert found[5].solver.meta["base"] == "dpmpp" and found[5].solver.meta["grid"] == "uniform"


def test_the_score_separates_mode_flips_from_typical_error():
    """One sample far off: the RMS moves with it, the median does not."""
    obj, _, den = _setup()
    z = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = calibration.bases(obj.schedule, 5)["unipc on logsnr"]
    target = learned.rollout(den, base.C, base.ts, z)
    clean = calibration.score(lambda idx: den, base, z, target)
    assert clean.rms == pytest.approx(0, abs=1e-12)
    target[0] += 10.0
    flipped = calibration.score(lambda idx: den, base, z, target)
    assert flipped.rms == pytest.approx(10 / math.sqrt(64), rel=1e-6) and flipped.median == pytest.approx(0, abs=1e-12)
    assert flipped.mean == pytest.approx(10 / 64, rel=1e-6)  # one per-sample RMS of 10, 63 of 0
    assert flipped.tail == pytest.approx(flipped.rms, rel=1e-6)  # the whole RMS is the one outlier's


def test_best_starts_from_the_near_best_base_that_flips_least():
    """Within NEAR x the lowest RMS, the base whose outliers (tail) carry the least of it wins, whatever its
    typical error; a base outside NEAR loses even with no flips at all."""
    S = calibration.Score
    scores = {"flips": S(rms=1.0e-2, mean=2e-3, median=1e-3, tail=9e-3),
              "steady": S(rms=1.2e-2, mean=1.1e-2, median=1.1e-2, tail=1e-3),
              "far": S(rms=2e-2, mean=2e-2, median=2e-2, tail=0.0)}
    assert calibration.best(scores) == "steady"
    del scores["steady"]
    assert calibration.best(scores) == "flips"


def test_a_model_that_drops_the_time_gradient_is_named():
    obj, _, den = _setup(detach_t=True)
    with pytest.raises(DiffxError, match="learn_times=true: the model's output changes with t") as e:
        calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[4], **SMALL)
    assert len(str(e.value).splitlines()) == 1
    _, _, good = _setup()
    calibration.check_time_gradient(good, torch.randn(2, 6, dtype=torch.float64))  # no error
    found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[4], learn_times=False, **SMALL)
    assert found[4].solver.steps == 4


@pytest.mark.parametrize("method", ["joint", "staged", "lbfgs"])
def test_every_fit_method_lowers_the_training_loss(method):
    obj, _, den = _setup()
    z = torch.randn(256, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = learned.reference(den, obj.schedule, z, 60)
    base = calibration.bases(obj.schedule, 4)["dpmpp on uniform"]
    losses = []
    fitted = learned.fit(lambda idx: den, base, z, target, iters=40, lr=3e-3, t_lr=3e-2, batch=256, method=method,
                         on_step=lambda i, loss: losses.append(loss), check_every=1)
    before = calibration.score(lambda idx: den, base, z, target)
    after = calibration.score(lambda idx: den, fitted, z, target)
    assert after.rms < 0.9 * before.rms, (method, before, after)
    assert losses and all(math.isfinite(v) for v in losses)


def test_an_unknown_method_is_a_one_line_error():
    obj, _, den = _setup()
    base = calibration.bases(obj.schedule, 4)["dpmpp on uniform"]
    z = torch.zeros(4, 6, dtype=torch.float64)
    with pytest.raises(DiffxError, match="method=adamw: expected one of joint, staged, lbfgs"):
        learned.fit(lambda idx: den, base, z, z, iters=1, method="adamw")


def test_a_method_list_keeps_its_order_and_a_bad_entry_fails_before_any_solve():
    assert calibration.methods("lbfgs") == ("lbfgs",)
    assert calibration.methods(["lbfgs", "joint", "lbfgs"]) == ("lbfgs", "joint")
    for bad in ([], ["joint", "adam"], [3]):
        with pytest.raises(DiffxError, match=r"^method=.*expected one of joint, staged, lbfgs, or a list"):
            calibration.methods(bad)
    bench = Path(__file__).parents[1] / "scripts" / "bench_samplers.py"
    out = subprocess.run([sys.executable, str(bench), "--calib-methods", "joint,adam"], capture_output=True, text=True)
    assert out.returncode == 2 and "method=['joint', 'adam']: expected one of" in out.stderr


def _score(errors):
    se = torch.as_tensor(errors, dtype=torch.float64)
    return calibration.Score(se.mean().sqrt().item(), se.sqrt().mean().item(), se.sqrt().median().item(), 0.0, se)


def test_confidence_separates_a_gain_everywhere_from_one_carried_by_a_single_flip():
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.rand(128, generator=g, dtype=torch.float64) + 0.01) ** 2
    everywhere = base * 0.8  # every sample 0.8x as far off
    assert calibration.confidence(_score(everywhere), _score(base)) == 1.0
    # The base has one flip the fit repairs; the fit's typical error is barely lower: it 'beats' the base,
    # but only the draws holding that one noise see it (1 - (1 - 1/128)^128 = 63%)
    flip_base, flip_fit = base.clone(), base * 0.999
    flip_base[7] = 1.0
    flip_fit[7], flip_fit[8] = base[7], 0.9  # ... and it adds another flip elsewhere
    a, b = _score(flip_fit), _score(flip_base)
    assert a.beats(b) and calibration.confidence(a, b) < 0.75
    assert calibration.confidence(b, b) == 0.0  # a tie is not a win


def test_the_guard_keeps_a_fit_only_at_the_asked_confidence():
    obj, _, den = _setup()
    for level in (0.0, 0.999):
        found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[4], seed=0, confidence=level, **SMALL)
        r = found[4]
        val = r.scores["validation"]
        assert r.confidence == calibration.confidence(val["fit"], val["base"])
        assert (r.kept == "fit") == (val["fit"].beats(val["base"]) and r.confidence >= level)
    with pytest.raises(DiffxError, match=r"confidence=1: expected a share in \[0, 1\)"):
        calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[4], confidence=1, **SMALL)


def test_several_freezes_and_methods_fit_each_and_keep_the_lowest_mean_that_passes_the_guard(monkeypatch):
    """freeze=[0.5, 0], method=[joint, lbfgs]: one fit per method and share, each the same as a calibration with
    that pair alone; of those that beat the base at the asked confidence, the lowest per-sample mean on validation
    is kept."""
    obj, model, den = _setup()
    run = dict(noise_shape=(6,), steps=[6], seed=0, confidence=0.0, **SMALL)
    both = calibration.calibrate(den, obj.schedule, freeze=[0.5, 0], method=["joint", "lbfgs"], **run)[6]
    pairs = {(m, f) for m in ("joint", "lbfgs") for f in (0.0, 0.5)}
    assert set(both.fits) == pairs
    for method, share in pairs:
        alone = calibration.calibrate(den, obj.schedule, freeze=share, method=method, **run)[6]
        assert alone.fits[method, share][0] == both.fits[method, share][0]
        assert (alone.method, alone.freeze) == (method, share)
    base = both.scores["validation"]["base"]
    passing = {k: s for k, (s, sure) in both.fits.items() if s.beats(base)}
    assert len(passing) >= 2  # several fits win here, so the choice between them is exercised
    assert both.kept == "fit"
    assert (both.method, both.freeze) == min(passing, key=lambda k: (passing[k].mean, passing[k].rms))
    assert both.scores["validation"]["fit"] == both.fits[both.method, both.freeze][0]
    monkeypatch.setattr(learned, "reference", lambda *a: pytest.fail("solved before checking freeze and method"))
    with pytest.raises(DiffxError, match=r"freeze=\[0, 1\]: expected a share of the calls in \[0, 1\)"):
        calibration.calibrate(den, obj.schedule, freeze=[0, 1], **run)
    with pytest.raises(DiffxError, match=r"method=\['joint', 'adam'\]: expected one of joint, staged, lbfgs"):
        calibration.calibrate(den, obj.schedule, method=["joint", "adam"], **run)
