"""Sampling plans: what each sampler declares is what it does; a fitted solver brings its own times."""

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config, make_objective
from diffx import grids, samplers
from diffx.config import config_dir
from diffx.errors import DiffxError
from diffx.samplers import learned, plan

CLASSICAL = sorted(p.stem for p in (config_dir() / "sampler").glob("*.yaml") if p.stem != "learned")


@pytest.mark.parametrize("name", CLASSICAL)
def test_a_sampler_is_deterministic_exactly_when_it_declares_so(name):
    """The declaration against the behaviour: traced with two different generators, a deterministic
    sampler gives the same linear map; a stochastic one does not."""
    sampler = instantiate(compose_config("sample", [f"sampler={name}"]).sampler)
    schedule = make_objective("ddpm", "cosine").schedule
    ts = grids.uniform(5, schedule)
    (_, c0), (_, c1) = (learned._trace_rows(sampler, schedule, ts, seed) for seed in (0, 1))
    assert plan.is_deterministic(sampler) == torch.allclose(c0, c1)


def test_options_decide_a_declared_predicate():
    assert plan.is_deterministic(samplers.ddim) and not plan.is_deterministic(samplers.dpmpp_sde)
    from functools import partial

    assert not plan.is_deterministic(partial(samplers.ddim, eta=1.0))
    assert plan.is_deterministic(partial(samplers.dpmpp_sde, eta=0.0))


def test_a_classical_plan_runs_steps_of_its_grid_and_defaults_to_30():
    schedule = make_objective("flow", "linear").schedule
    p = plan.make(samplers.dpmpp, grids.uniform, None, schedule)
    assert p.steps == plan.DEFAULT_STEPS and len(p.ts) == plan.DEFAULT_STEPS + 1 and p.name == "dpmpp"
    p = plan.make(samplers.heun, grids.karras, 7, schedule)
    assert torch.equal(p.ts, grids.karras(7, schedule)) and p.grid == "karras" and p.note is None


def test_a_fitted_solver_plans_its_own_times_and_refuses_other_steps():
    schedule = make_objective("flow", "linear").schedule
    solver = learned.trace(samplers.unipc, schedule, grids.uniform(4, schedule))
    solver.meta = {"base": "unipc", "grid": "uniform"}
    p = plan.make(solver, grids.uniform, None, schedule)
    assert p.steps == 4 and torch.equal(p.ts, solver.ts) and p.name == "learned(unipc)" and p.deterministic
    assert plan.make(solver, grids.uniform, 4, schedule).note is None
    with pytest.raises(DiffxError, match="steps=10: sampler=learned\\(unipc\\) was fitted for 4 steps"):
        plan.make(solver, grids.uniform, 10, schedule)
    note = plan.make(solver, grids.karras, None, schedule).note
    assert "grid=karras is not used" in note and "grid=uniform" in note
