"""A sampling plan: a sampler bound to the times it calls the model at, and what it declares.

A sampler is a function ``sampler(denoise, schedule, x, ts, generator=None, **options)`` (a Hydra
partial binds its options, ``conf/sampler/*.yaml``) or a fitted solver (``diffx.samplers.learned``),
which brings its own call times. Either way it declares, and this module alone reads:

- ``deterministic``: the sample is a function of the start noise alone (no fresh noise per step), so
  it can be traced into a linear solver and fitted (``diffx calibrate``);
- ``ts`` (a fitted solver only): its own call times, which replace ``steps`` and the grid.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from diffx.errors import DiffxError
from diffx.samplers import guard

DEFAULT_STEPS = 30  # `steps: null` in conf/sample.yaml and conf/eval.yaml, for a sampler with no own times


def declare(*, deterministic: bool | Callable[[dict], bool]):
    """Record what a sampler function declares: ``deterministic`` is a bool, or a predicate of the
    sampler's options with their defaults filled in (``lambda options: options["eta"] == 0``). The
    declared sampler runs under the divergence guard (``diffx.samplers.guard``)."""
    def mark(fn):
        @functools.wraps(fn)
        def guarded(denoise, schedule, x, ts, *args, **kwargs):
            return guard.run(fn, denoise, schedule, x, ts, *args, **kwargs)
        guarded.deterministic = deterministic
        return guarded
    return mark


def is_deterministic(sampler) -> bool:
    """What ``sampler`` (a declared function, a partial of one, or a fitted solver) declares."""
    fn, options = _unbind(sampler)
    rule = getattr(fn, "deterministic", None)
    if rule is None:
        raise TypeError(f"{fn!r} declares nothing: decorate it with diffx.samplers.plan.declare")
    if callable(rule):
        bound = inspect.signature(fn).bind_partial(**options)
        bound.apply_defaults()
        return bool(rule(bound.arguments))
    return bool(rule)


def name_of(sampler) -> str:
    """``dpmpp``, ``ddim``, ...; a fitted solver names itself (``learned(unipc)``), so does ``grid=auto``."""
    fn, _ = _unbind(sampler)
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _unbind(sampler) -> tuple[Callable, dict]:
    if isinstance(sampler, functools.partial):  # what Hydra's `_partial_: true` builds
        return sampler.func, dict(sampler.keywords)
    return sampler, {}


@dataclass(frozen=True)
class Plan:
    """Everything needed to run a sampler and to report what ran: ``plan(denoise, schedule, x)``.

    ``steps`` is what the user asked for (Heun calls the model up to twice a step; the denoiser's
    ``nfe`` counts calls); ``note`` says what of the request the sampler does not use, if anything."""

    sampler: Callable
    ts: Tensor
    name: str
    steps: int
    deterministic: bool
    grid: str | None = None  # the grid the call times came from
    note: str | None = None
    own_times: bool = False  # the sampler brought its call times (a fitted solver): no other grid fits it

    def __call__(self, denoise, schedule, x: Tensor, generator=None) -> Tensor:
        try:
            return self.sampler(denoise, schedule, x, self.ts, generator=generator)
        except guard.Diverged as e:
            raise e.on_grid(self.grid) from None


def make(sampler, grid, steps: int | None, schedule) -> Plan:
    """Bind ``sampler`` to ``steps`` steps of ``grid`` (``grid(steps, schedule) -> ts``), or to its own
    call times when it has them: then ``steps``, if given, must agree with them."""
    chosen = None
    if hasattr(sampler, "resolve"):  # sampler=auto: the measured pair for this schedule and NFE
        steps = DEFAULT_STEPS if steps is None else steps
        sampler, grid, chosen = sampler.resolve(grid, steps, schedule)
    name, deterministic = name_of(sampler), is_deterministic(sampler)
    own = getattr(sampler, "ts", None)
    if own is None:
        steps = DEFAULT_STEPS if steps is None else steps
        return Plan(sampler, grid(steps, schedule), name, steps, deterministic, name_of(grid), chosen)
    if steps is not None and steps != len(own):
        raise DiffxError(f"steps={steps}: sampler={name} was fitted for {len(own)} steps on its own call times; "
                         f"leave steps= out, or fit one for {steps} steps (diffx calibrate steps={steps})")
    fitted_on, asked = getattr(sampler, "grid", None), name_of(grid)
    note = (f"{name} calls the model at its {len(own)} fitted times (from grid={fitted_on}); grid={asked} is not used"
            if fitted_on not in (None, asked) else None)
    return Plan(sampler, own, name, len(own), deterministic, fitted_on, note, own_times=True)


def nfe_of(sampler, steps: int, grid=None, schedule=None) -> int:
    """Network calls ``sampler`` makes on ``steps`` steps of ``grid`` (default: uniform on the flow
    path), counted by running it on a stand-in denoiser (a 1x1 state): Heun's 2 a step but not into
    t = 0, a fitted solver's own count."""
    from diffx import grids, schedules

    own = getattr(sampler, "ts", None)
    if own is not None:
        return len(own)
    schedule = schedules.FlowLinear() if schedule is None else schedule
    ts = (grid or grids.uniform)(steps, schedule)
    table = dict(zip(ts.tolist(), schedule.table(ts)))
    calls = [0]

    def stand_in(x, t):
        calls[0] += 1
        alpha, sigma = table.get(float(t)) or schedule.table(torch.tensor([float(t)], dtype=torch.float64))[0]
        return torch.zeros_like(x), x / sigma  # x0_hat = 0: every point stays on the path

    stand_in.checked = True  # not a state of the model's: no divergence guard
    sampler(stand_in, schedule, torch.ones(1, 1, dtype=torch.float64), ts, generator=torch.Generator().manual_seed(0))
    return calls[0]


def steps_for_nfe(sampler, nfe: int, grid=None, schedule=None) -> int:
    """The most steps whose network calls fit in ``nfe`` (``nfe_of``): ``nfe`` for one-call samplers,
    ``(nfe + 1) // 2`` for Heun. A budget too small for one step is a one-line error."""
    for steps in range(nfe, 0, -1):
        if nfe_of(sampler, steps, grid, schedule) <= nfe:
            return steps
    raise DiffxError(f"steps={nfe}: sampler={name_of(sampler)} needs more network calls than that for one step")
