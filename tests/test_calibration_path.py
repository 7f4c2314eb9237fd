"""The fit's loss on the intermediate states (``learned.fit(path=, path_weight=)``, ``diffx calibrate
path_weight=``): the recorded reference path is the ODE solution at any time, and fitting to it brings
the solver's query points onto that path."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_calibration import SMALL, _setup

from diffx import calibrate as cli
from diffx.errors import DiffxError
from diffx.samplers import calibration, learned
from diffx.samplers.calibration import bases


@pytest.mark.parametrize("family,schedule", [("ddpm", "linear"), ("flow", "linear")])
def test_the_recorded_path_is_the_ode_solution_between_its_nodes(family, schedule, monkeypatch):
    """``Trajectory.at(t)`` from every 8th call of the reference solve against the solve's own state at
    each call in between (recorded at every call), and differentiable in t."""
    obj, _, den = _setup(family, schedule)
    z = torch.randn(32, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    path = learned.trajectory(den, obj.schedule, z.clone(), steps=200)
    monkeypatch.setattr(learned, "TRAJECTORY_EVERY", 1)
    dense = learned.trajectory(den, obj.schedule, z.clone(), steps=200)
    assert len(path.lam) == 25 and len(dense.lam) == 199
    rows = torch.arange(32)
    for k in range(0, 190, 3):
        t = obj.schedule.t_of_lambda(dense.lam[k:k + 1])[0]
        alpha, sigma = obj.schedule.alpha_sigma(t)
        assert (path.at(t, rows) - dense.v[:, k] * alpha.hypot(sigma)).pow(2).mean().sqrt() < 5e-3
    tt = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    path.at(tt, rows).sum().backward()
    assert tt.grad is not None and torch.isfinite(tt.grad) and tt.grad != 0


def test_the_path_loss_brings_the_query_points_onto_the_reference_path():
    """From the same base, a fit with ``path_weight`` ends with its intermediate states nearer the
    reference path than one without (an endpoint-only fit moves them off it)."""
    obj, _, den = _setup()
    z = torch.randn(256, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = calibration.references(lambda idx: den, obj.schedule, z, 40, 256)
    path = calibration.trajectories(lambda idx: den, obj.schedule, z, 40, 256)
    base = bases(obj.schedule, 6)["unipc on uniform"]
    fits = {w: learned.fit(lambda idx: den, base, z, target, iters=60, batch=256, path=path, path_weight=w)
            for w in (0.0, 1.0)}

    def off_path(solver):
        xs = learned.points(den, solver.C, solver.ts, z)
        return sum((xs[i] - path.at(solver.ts[i], torch.arange(256))).pow(2).mean() for i in range(1, solver.steps))

    assert off_path(fits[1.0]) < off_path(fits[0.0])


def test_calibrate_with_a_path_weight_runs_and_still_never_loses_to_its_base():
    obj, _, den = _setup()
    found = calibration.calibrate(den, obj.schedule, noise_shape=(6,), steps=[5], path_weight=1.0, **SMALL)
    val = found[5].scores["validation"]
    assert val[found[5].kept].rms <= val["base"].rms


def test_a_path_weight_without_a_path_or_below_zero_is_a_one_line_error():
    obj, _, den = _setup()
    base = bases(obj.schedule, 4)["ddim on uniform"]
    z = torch.zeros(4, 6, dtype=torch.float64)
    with pytest.raises(DiffxError, match="path_weight"):
        learned.fit(lambda idx: den, base, z, z, iters=1, path_weight=1.0)
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "calibrate.yaml")
    cfg.ckpt, cfg.path_weight = "model.safetensors", -1.0
    with pytest.raises(DiffxError, match=r"^path_weight=-1.0: ") as err:
        cli.calibrate(cfg)
    assert "\n" not in str(err.value)
