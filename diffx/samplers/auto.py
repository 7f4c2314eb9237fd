"""``sampler=auto`` (and ``grid=auto``): the best untuned sampler and grid for the model's schedule and
the NFE, read from a small table measured on diffx's own benchmark.

The benchmark (``python scripts/bench_samplers.py --defaults``, README "Samplers") runs every
deterministic sampler x grid on 64-D Gaussian mixtures whose denoiser is exact, against a DOP853 solve
of the same ODE from the same noise. With an exact denoiser the prediction (eps, v, x0, velocity) is
only a change of variables, so the table is per schedule -- the curve ``lambda(t)`` the samplers see --
and per NFE. A schedule that is none of the four is matched to the nearest by ``lambda(t)``.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch

from diffx import grids, schedules
from diffx.samplers import multistep, single

SAMPLERS = {"ddim": single.ddim, "euler": single.euler, "heun": single.heun, "dpmpp": multistep.dpmpp,
            "dpmpp_3m": multistep.dpmpp_3m, "unipc": multistep.unipc, "ipndm": multistep.ipndm}
GRIDS = {"uniform": grids.uniform, "karras": grids.karras, "logsnr": grids.logsnr}

# kind -> [(up to NFE, sampler, its options, grid)], read off `python scripts/bench_samplers.py --defaults
# --dim 64 --nfe 5 10 15 20 30 --n 4096 --seeds 0 1 2 --cases ...` (three 64-D mixtures, README "Samplers"): at each
# NFE, among the pairs within 1.25x of the lowest geometric-mean RMS, the one with the lowest mean per-sample error
# (`calibration.NEAR`), merged into ranges: each row holds up to its NFE. The DDPM rows' first end is from an
# earlier run (n 1024) that also had --nfe 7, where uniform still won.
TABLE: dict[str, list[tuple[float, str, dict, str]]] = {
    "ddpm-linear": [(7, "unipc", {"order": 3}, "uniform"), (15, "unipc", {"order": 3}, "logsnr"),
                    (20, "ipndm", {}, "logsnr"), (math.inf, "unipc", {"order": 3}, "karras")],
    "ddpm-cosine": [(7, "unipc", {"order": 3}, "uniform"), (15, "ipndm", {}, "logsnr"),
                    (20, "unipc", {"order": 3}, "logsnr"), (math.inf, "ipndm", {}, "logsnr")],
    "flow-linear": [(10, "unipc", {"order": 3}, "uniform"), (15, "ipndm", {}, "logsnr"),
                    (20, "ipndm", {}, "karras"), (math.inf, "ipndm", {}, "uniform")],
    "flow-cosine": [(10, "unipc", {"order": 3}, "uniform"), (15, "ipndm", {}, "logsnr"),
                    (20, "unipc", {"order": 3}, "logsnr"), (math.inf, "unipc", {"order": 3}, "karras")],
}

# The schedules the table was measured on, by the name the table uses.
KINDS = {"ddpm-linear": schedules.ddpm_linear, "ddpm-cosine": schedules.ddpm_cosine,
         "flow-linear": schedules.FlowLinear, "flow-cosine": schedules.FlowCosine}
_PROBE = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)  # where lambda(t) is compared


def kind(schedule) -> str:
    """The table's schedule nearest to ``schedule``: the same end (alpha(1) = 0 or not) and the
    smallest mean squared difference in ``lambda(t)`` (what a sampler and a grid see of a schedule)."""
    lam = schedule.lambda_(_PROBE)
    flow = schedule.table(torch.ones(1, dtype=torch.float64))[0][0] == 0.0
    same_end = [k for k in KINDS if k.startswith("flow") == flow]
    return min(same_end, key=lambda k: float((_reference_lambda(k) - lam).pow(2).mean()))


@functools.lru_cache(maxsize=None)
def _reference_lambda(name: str) -> torch.Tensor:
    return KINDS[name]().lambda_(_PROBE)


def entry(schedule, nfe: int) -> tuple[str, dict, str]:
    """``(sampler name, options, grid name)`` the table gives for ``schedule`` at ``nfe`` calls."""
    rows = TABLE[kind(schedule)]
    i = bisect.bisect_left([r[0] for r in rows], nfe)
    _, name, options, grid = rows[min(i, len(rows) - 1)]
    return name, options, grid


def choose(schedule, nfe: int):
    """``(sampler, grid)`` callables: the table's pair for ``schedule`` at ``nfe`` network calls."""
    name, options, grid = entry(schedule, nfe)
    return functools.partial(SAMPLERS[name], **options), GRIDS[grid]


def describe(schedule, nfe: int) -> str:
    name, options, grid = entry(schedule, nfe)
    opts = "".join(f" {k}={v}" for k, v in options.items())
    return f"{name}{opts} [{grid}]"


@dataclass(frozen=True)
class Auto:
    """``sampler=auto``: resolved when the plan is made (``diffx.samplers.plan.make``), once the schedule
    and the step count are known; ``steps`` is read as the NFE budget (every sampler in the table calls
    the model once a step)."""

    name = "auto"
    deterministic = True  # every sampler in the table is (diffx.samplers.plan)

    def __call__(self, denoise, schedule, x, ts, generator=None):
        """Called directly on a grid: the table's sampler for ``len(ts) - 1`` steps, on ``ts``."""
        sampler, _ = choose(schedule, len(ts) - 1)
        return sampler(denoise, schedule, x, ts, generator=generator)

    def resolve(self, grid, steps: int, schedule) -> tuple:
        """``(sampler, grid, note)``: the table's pair, or its sampler on a grid named by hand."""
        sampler, table_grid = choose(schedule, steps)
        if isinstance(grid, AutoGrid):
            grid = table_grid
        return sampler, grid, (f"sampler=auto chose {describe(schedule, steps)} for a {kind(schedule)} "
                               f"schedule at {steps} NFE (README, Samplers)")


@dataclass(frozen=True)
class AutoGrid:
    """``grid=auto``: the table's grid with ``sampler=auto``; with a sampler named by hand, ``uniform``,
    the grid every sampler was written and tested on (and the default before ``auto``)."""

    name = "uniform"

    def __call__(self, steps: int, schedule=None, **_):
        return grids.uniform(steps, schedule)
