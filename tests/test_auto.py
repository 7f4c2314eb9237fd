"""sampler=auto / grid=auto (diffx.samplers.auto) and the NFE budget helper (diffx.samplers.plan)."""

import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config, make_objective
from diffx import grids, samplers
from diffx.errors import DiffxError
from diffx.samplers import auto, calibration, learned, plan

KINDS = [("ddpm", "linear"), ("ddpm", "cosine"), ("flow", "linear"), ("flow", "cosine")]


@pytest.mark.parametrize("family,schedule", KINDS)
def test_each_schedule_is_recognised_by_its_lambda_curve(family, schedule):
    assert auto.kind(make_objective(family, schedule).schedule) == f"{family}-{schedule}"


def test_a_schedule_not_in_the_table_gets_the_nearest():
    from diffx import schedules

    assert auto.kind(schedules.ddpm_linear(beta_end=0.021)) == "ddpm-linear"
    assert auto.kind(schedules.ddpm_cosine(s=0.01)) == "ddpm-cosine"


@pytest.mark.parametrize("family,schedule", KINDS)
@pytest.mark.parametrize("steps", [None, 5, 10, 20])
def test_the_default_config_plans_the_tables_pair(family, schedule, steps):
    sched = make_objective(family, schedule).schedule
    cfg = compose_config("sample", [] if steps is None else [f"steps={steps}"])
    p = plan.make(instantiate(cfg.sampler), instantiate(cfg.grid), cfg.steps, sched)
    nfe = plan.DEFAULT_STEPS if steps is None else steps
    name, options, grid = auto.entry(sched, nfe)
    assert p.name == name and p.grid == grid and p.steps == nfe and p.deterministic
    assert torch.equal(p.ts, auto.GRIDS[grid](nfe, sched))
    assert "sampler=auto chose" in p.note and f"{family}-{schedule}" in p.note
    assert plan.nfe_of(p.sampler, p.steps, auto.GRIDS[grid], sched) == nfe  # steps is the NFE budget


def test_a_named_grid_is_kept_and_a_named_sampler_gets_uniform():
    sched = make_objective("ddpm", "linear").schedule
    p = plan.make(auto.Auto(), grids.karras, 10, sched)
    assert p.grid == "karras" and torch.equal(p.ts, grids.karras(10, sched))
    p = plan.make(samplers.dpmpp, auto.AutoGrid(), 10, sched)
    assert p.name == "dpmpp" and p.grid == "uniform" and torch.equal(p.ts, grids.uniform(10, sched)) and p.note is None


def test_auto_called_on_a_grid_is_the_tables_sampler():
    obj = make_objective("ddpm", "cosine")
    from analytic import GaussianModel

    model = GaussianModel(obj)
    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = grids.logsnr(10, obj.schedule)
    chosen, _ = auto.choose(obj.schedule, 10)
    a = auto.Auto()(samplers.make_denoiser(model, obj), obj.schedule, z.clone(), ts)
    b = chosen(samplers.make_denoiser(model, obj), obj.schedule, z.clone(), ts)
    assert torch.equal(a, b)


def test_steps_for_an_nfe_budget():
    heun, unipc = samplers.heun, samplers.unipc
    assert [plan.steps_for_nfe(heun, n) for n in (1, 2, 3, 4, 5, 9, 10)] == [1, 1, 2, 2, 3, 5, 5]
    assert [plan.steps_for_nfe(unipc, n) for n in (1, 5, 10)] == [1, 5, 10]
    sched = make_objective("flow", "linear").schedule
    solver = learned.trace(unipc, sched, grids.uniform(6, sched))
    assert plan.nfe_of(solver, 99) == 6


def test_a_budget_below_one_step_is_a_one_line_error():
    class Greedy:  # three calls for any step
        deterministic = True

        def __call__(self, denoise, schedule, x, ts, generator=None):
            for _ in range(3):
                denoise(x, float(ts[0]))
            return x

    with pytest.raises(DiffxError, match="steps=2: sampler=Greedy needs more network calls"):
        plan.steps_for_nfe(Greedy(), 2)


# ---------------------------------------------------------------------- the table against measurement
class _Mixture(torch.nn.Module):
    """An exact 'network' for a 64-D, 8-component Gaussian mixture (std 0.05), as in the benchmark."""

    def __init__(self, objective, seed=0, dim=64, k=8, c=0.05):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(k, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8
        self.logw = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64) * 0.5, 0)
        self.objective, self.c2 = objective, c * c

    def forward(self, x, t, cond=None):
        alpha, sigma = (v[:, None].to(x.dtype) for v in self.objective.schedule.alpha_sigma(t))
        var = alpha**2 * self.c2 + sigma**2
        d = x[:, None, :] - alpha[:, None] * self.mu
        resp = torch.softmax(self.logw - (d**2).sum(-1) / (2 * var), dim=1)
        mean = resp @ self.mu
        x0 = mean + (alpha * self.c2 / var) * (x - alpha * mean)
        return self.objective.target(x0, (x - alpha * x0) / sigma, t)


@pytest.mark.slow
@pytest.mark.parametrize("family,schedule", KINDS)
def test_auto_is_within_1_5x_of_the_best_untuned_pair_at_5_10_20_nfe(family, schedule):
    """Issue #16's goal, re-measured here: on the benchmark's three mixtures (seeds 0-2, as
    `scripts/bench_samplers.py --defaults` draws them) against the model's own accurate solve, the geometric
    mean RMS of auto's pair is within 1.5x of the best deterministic sampler x grid at 5, 10 and 20 NFE. At 4,096
    noises per mixture, as the table was read: at 20 NFE the RMS is a few mode flips, which 1,024 noises count
    too noisily (there the table's pairs and their neighbours swap ranks by 2x and more between noise sets)."""
    obj = make_objective(family, schedule)
    logs: dict = {}
    for seed in (0, 1, 2):
        den = samplers.make_denoiser(_Mixture(obj, seed=seed), obj)
        z = torch.randn(4096, 64, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        target = learned.reference(den, obj.schedule, z, 500)
        for nfe in (5, 10, 20):
            for label, solver in calibration.bases(obj.schedule, nfe).items():
                rms = calibration.score(lambda idx: den, solver, z, target, batch=1024).rms
                logs.setdefault((nfe, label), []).append(math.log(rms))
    for nfe in (5, 10, 20):
        gm = {label: math.exp(sum(v) / 3) for (n, label), v in logs.items() if n == nfe}
        name, options, grid = auto.entry(obj.schedule, nfe)
        label = f"{name}{''.join(f' {k}={v}' for k, v in options.items())} on {grid}"
        assert gm[label] <= 1.5 * min(gm.values()), (nfe, label, gm[label], min(gm, key=gm.get), min(gm.values()))
