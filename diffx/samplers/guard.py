"""The divergence guard every declared sampler runs under (``diffx.samplers.plan.declare``).

A sampler that blows up (a step far outside its stability region, a model that returns inf) would
otherwise write garbage PNGs without a word. The guard watches the state the sampler passes to the
model at every call, and its output: a non-finite value, or a per-sample RMS more than ``GROWTH``
times the start's (at least 1), stops the run with one line naming the sampler, the step and, once
``Plan`` adds it, the grid. On the paths diffx samples (alpha, sigma <= 1, data in [-1, 1] or a
unit-scaled latent) every state is ``alpha x0 + sigma noise``, so its RMS is a few units at most.

It costs no host synchronisation per step: the first bad call is recorded on the device and read
once, after the sampler returns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffx.errors import DiffxError

GROWTH = 100.0  # a state this many times the start's RMS is off every diffusion path: diverged


class Diverged(DiffxError):
    """A sampler's state went non-finite or exploded at ``step`` (1-based, of ``steps``)."""

    def __init__(self, sampler: str, step: int, steps: int, t: float | None, what: str, grid: str | None = None):
        self.sampler, self.step, self.steps, self.t, self.what, self.grid = sampler, step, steps, t, what, grid
        where = f"step {step}/{steps}" + (f" (t={t:.4g})" if t is not None else " (its output)")
        on = f" grid={grid}" if grid else ""
        super().__init__(f"sampler={sampler}{on} diverged at {where}: {what}; try another sampler= or grid=, "
                         "or more steps=")

    def on_grid(self, grid: str | None) -> "Diverged":
        """The same error, naming the grid the call times came from (``Plan`` knows it; the sampler does not)."""
        return Diverged(self.sampler, self.step, self.steps, self.t, self.what, grid)


def _rms(x: Tensor) -> Tensor:
    """Largest per-sample RMS of a (B, ...) state, on its device."""
    return x.detach().reshape(len(x), -1).double().pow(2).mean(1).sqrt().amax()


class Watch:
    """``denoise`` behind a recorder: ``code`` 1 (non-finite) or 2 (exploding) at the first bad call."""

    checked = True  # a sampler that calls another (euler -> ddim) is watched once, by the outer one

    def __init__(self, denoise, ts: Tensor, x: Tensor):
        self.denoise, self.grid_ts = denoise, [float(t) for t in ts]
        self.limit = GROWTH * _rms(x).clamp_min(1.0)
        self.first = torch.zeros(2, dtype=torch.long, device=x.device)  # (code, call index) of the first bad state
        self.calls: list[float] = []

    def __getattr__(self, name):  # nfe and the like stay the wrapped denoiser's
        if name == "denoise":
            raise AttributeError(name)
        return getattr(self.denoise, name)

    def __call__(self, x: Tensor, t):
        self.see(x)
        self.calls.append(float(t))
        return self.denoise(x, t)

    def see(self, x: Tensor) -> None:
        code = torch.where(torch.isfinite(x).all(), (_rms(x) > self.limit).long() * 2, torch.ones((), dtype=torch.long,
                                                                                            device=x.device))
        new = torch.stack([code, torch.tensor(len(self.calls), device=x.device)])
        self.first = torch.where((self.first[0] == 0) & (code > 0), new, self.first)

    def check(self, out: Tensor, sampler: str) -> None:
        """Raise ``Diverged`` if any watched state, or ``out``, was bad (the one host sync)."""
        self.see(out)
        code, call = self.first.tolist()
        if code == 0:
            return
        what = "the state is not finite (NaN or inf)" if code == 1 else \
            f"the state's RMS exceeds {GROWTH:g}x the start's ({float(self.limit):.3g})"
        t = self.calls[call] if call < len(self.calls) else None
        nodes = self.grid_ts[:-1] if self.grid_ts[-1] == 0.0 else self.grid_ts  # a fitted solver's: calls only
        steps = len(nodes)
        step = steps if t is None else sum(1 for s in nodes if s > t + 1e-12) + 1
        raise Diverged(sampler, min(step, steps), steps, t, what)


def run(fn, denoise, schedule, x: Tensor, ts: Tensor, *args, name: str | None = None, **kwargs) -> Tensor:
    """``fn(denoise, schedule, x, ts, ...)`` under the guard, unless ``denoise`` is watched already
    (or declares ``checked``: the tracer of ``diffx.samplers.learned`` runs samplers on coefficient vectors)."""
    if getattr(denoise, "checked", False):
        return fn(denoise, schedule, x, ts, *args, **kwargs)
    watch = Watch(denoise, ts, x)
    out = fn(watch, schedule, x, ts, *args, **kwargs)
    watch.check(out, name or fn.__name__)
    return out
