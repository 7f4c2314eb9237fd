"""A sampler fitted to one model: the linear multistep family, with its coefficients and time grid
learned from that model's own accurate ODE solutions.

Every deterministic diffx sampler (DDIM/Euler, Heun, DPM-Solver++(2M/3M), UniPC with its corrector,
iPNDM) is, for a given grid, a *linear* map from the start noise and the denoiser outputs so far to
the next query point: with ``z`` the start noise and ``x0_j = D(x_j, t_j)`` the model's clean-data
predictions,

    x_i = C[i, 0] z + sum_{j < i} C[i, j + 1] x0_j,        x_n (the sample) = row n of C,

with ``C`` lower-triangular. ``trace`` reads ``C`` off any such sampler exactly (it runs the sampler
on basis vectors). ``fit`` then tunes ``C`` and the call times ``t_i`` to minimise the endpoint error
against the model's own high-accuracy ODE solution from the same noise, on calibration noise only:
the approach of S4S (Frankel et al. 2025, "solving for a diffusion model solver": coefficients and
times), of LD3 (Tong et al. 2024: times) and of bespoke solvers (Shaul et al. 2023). It starts at the
classical sampler, so on the calibration set it can only do better; the held-out error is reported.

The result is a ``LinearSolver``: at sampling time it costs exactly ``n`` network calls, like the
sampler it came from, and is stored as a small safetensors file (``save`` / ``load``) -- two float
tensors and JSON metadata, nothing executable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from diffx import grids
from diffx.errors import DiffxError
from diffx.samplers import multistep
from diffx.samplers.plan import is_deterministic, name_of

FORMAT = "diffx.linear_solver"


@dataclass
class LinearSolver:
    """``ts``: (n,) model-call times; ``C``: (n + 1, n + 1) lower-triangular coefficients (row i is
    query point i, row n the output, over ``[z, x0_0, ..., x0_{n-1}]``); ``meta``: provenance."""

    ts: Tensor
    C: Tensor
    meta: dict = field(default_factory=dict)
    deterministic: ClassVar[bool] = True  # a linear map of the start noise (diffx.samplers.plan)

    @property
    def steps(self) -> int:
        return len(self.ts)

    @property
    def name(self) -> str:
        return f"learned({self.meta.get('base', '?')})"

    @property
    def grid(self) -> str | None:
        """The grid the base sampler's call times came from, before fitting."""
        return self.meta.get("grid")

    def __call__(self, denoise, schedule=None, x: Tensor | None = None, ts=None, generator=None) -> Tensor:
        """The sampler signature, at call times ``ts`` (default: the solver's own, ``self.ts``)."""
        with torch.no_grad():
            return rollout(denoise, self.C, self.ts if ts is None else ts, x)


def rollout(denoise, C: Tensor, ts: Tensor, z: Tensor) -> Tensor:
    """Run the linear sampler ``C`` over call times ``ts`` from noise ``z`` (differentiable in C, ts)."""
    feats = [z]
    for i in range(len(ts)):
        x = _combine(C[i], feats)
        feats.append(denoise(x, ts[i])[0])
    return _combine(C[len(ts)], feats)


def _combine(row: Tensor, feats: list[Tensor]) -> Tensor:
    out = row[0].to(feats[0].dtype) * feats[0]
    for c, f in zip(row[1:len(feats)], feats[1:]):
        out = out + c.to(f.dtype) * f
    return out


def trace(sampler, schedule, ts: Tensor) -> LinearSolver:
    """The exact ``LinearSolver`` of a deterministic ``sampler`` on grid ``ts``.

    The sampler runs on coefficient vectors: the start "noise" is the basis vector e_0 and the k-th
    denoiser call returns e_k as x0_hat (and the noise_hat that follows from x and x0_hat on the
    path), so every point it reaches is its own row of C. A sampler that declares itself stochastic
    (``diffx.samplers.plan``) is refused: it is not a function of the start noise alone.
    """
    if not is_deterministic(sampler):
        raise DiffxError(f"sampler={name_of(sampler)} is stochastic: only a deterministic sampler "
                         "can be traced and fitted")
    call_ts, C = _trace_rows(sampler, schedule, ts)
    return LinearSolver(call_ts, C, {"base_steps": len(ts) - 1})


def _trace_rows(sampler, schedule, ts: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    n_max = 4 * len(ts)  # no sampler calls the model more than twice a step
    calls: list[tuple[float, Tensor]] = []

    def basis(x: Tensor, t) -> tuple[Tensor, Tensor]:
        t = float(t)
        calls.append((t, x[0].clone()))
        e = torch.zeros_like(x)
        e[0, len(calls)] = 1.0
        (a, s), = schedule.table(torch.tensor([t], dtype=torch.float64))
        return e, (x - a * e) / s

    z = torch.zeros(1, n_max + 1, dtype=torch.float64)
    z[0, 0] = 1.0
    out = sampler(basis, schedule, z, ts, generator=torch.Generator().manual_seed(seed))
    n = len(calls)
    C = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for i, (_, row) in enumerate(calls):
        C[i] = row[: n + 1]
    C[n] = out[0, : n + 1]
    return torch.tensor([t for t, _ in calls], dtype=torch.float64), C


@torch.no_grad()
def reference(denoise, schedule, z: Tensor, steps: int = 200) -> Tensor:
    """The model's own ODE endpoint from ``z``, to high accuracy: UniPC order 3 (4th order with its
    corrector) on ``steps`` log-SNR-uniform steps. On the exact mixture model of the benchmark this is
    within 1e-3 RMS of a DOP853 solve at 100 steps and more (scripts/bench_samplers.py)."""
    return multistep.unipc(denoise, schedule, z, grids.logsnr(steps, schedule), order=3)


def fit(denoiser_for, solver: LinearSolver, z: Tensor, target: Tensor, iters: int = 500, lr: float = 1e-3,
        t_lr: float = 1e-2, batch: int = 1024, seed: int = 0, learn_times: bool = True, val=None,
        on_step=None, check_every: int = 0) -> LinearSolver:
    """Adam on ``mean |rollout(z) - target|^2`` over mini-batches of the calibration pool (z, target),
    from ``solver`` (usually ``trace`` of a classical sampler), with a linear warm-up over the first
    5% of the steps and a cosine decay after it.

    ``val = (val_denoiser_for, z_val, target_val)``: noises kept out of the fit. If the fitted solver is
    not more accurate on them than ``solver``, ``solver`` is returned: a fit that went astray (a step
    budget or learning rate it does not suit) never makes sampling worse. Only the end point is
    compared, not every iterate: on multi-modal data the RMS is carried by a few samples, and picking
    the best of many noisy checkpoints would fit the validation noises instead.

    Parameters: a lower-triangular correction to C and, with ``learn_times`` (call times strictly
    decreasing), the call times, as a softmax over the n gaps ``t_0 - t_1, ..., t_{n-1} - 0``, so they
    stay ordered, inside (0, t_0] and start exactly where the solver's do. ``denoiser_for(idx)`` is the
    denoiser for pool rows ``idx`` (their conditions); its ``denoise(x, t)`` must accept a 0-dim tensor
    ``t`` and be differentiable in ``x`` (and in ``t`` for the times). Every ``check_every`` steps
    (default: a tenth of them) and at the last, the mini-batch loss is read back -- the only host sync
    of the loop --, checked for NaN/inf and passed to ``on_step(i, loss)``.
    """
    ts0, C0 = solver.ts.to(torch.float64), solver.C.to(torch.float64)
    gaps = ts0 - torch.cat([ts0[1:], ts0.new_zeros(1)])
    learn_times = learn_times and bool((gaps > 0).all())
    mask = torch.tril(torch.ones_like(C0))
    dC = torch.zeros_like(C0, requires_grad=True)
    u = gaps.log().clone().requires_grad_(learn_times)
    groups = [{"params": [dC], "lr": lr}] + ([{"params": [u], "lr": t_lr}] if learn_times else [])
    opt = torch.optim.Adam(groups)
    warm = max(1, iters // 20)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(math.pi * i / max(iters, 1)))))
    g = torch.Generator().manual_seed(seed)
    check_every = check_every or max(1, iters // 10)

    def current() -> LinearSolver:
        with torch.no_grad():
            ts = _times(ts0[0], u) if learn_times else ts0
            return LinearSolver(ts.detach().clone(), (C0 + dC * mask).detach().clone(), dict(solver.meta))

    for i in range(iters):
        idx = torch.randperm(len(z), generator=g)[:batch]
        ts = _times(ts0[0], u) if learn_times else ts0
        out = rollout(denoiser_for(idx), C0 + dC * mask, ts, z[idx.to(z.device)])
        loss = (out - target[idx.to(z.device)]).double().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        if (i + 1) % check_every == 0 or i + 1 == iters:
            value = loss.item()
            if not math.isfinite(value):
                raise DiffxError(f"the solver fit diverged by step {i + 1} (loss {value}); lower lr= / t_lr=")
            if on_step is not None:
                on_step(i, value)
    fitted = current()
    if val is not None and rms(val[0], fitted, val[1], val[2], batch) >= rms(val[0], solver, val[1], val[2], batch):
        return solver
    return fitted


def _times(t0: Tensor, u: Tensor) -> Tensor:
    """Call times from gap logits: ``t_i = t_0 (1 - sum_{k < i} softmax(u)_k)``, i = 0..n-1."""
    frac = torch.cumsum(torch.softmax(u, 0), 0)[:-1]
    return torch.cat([t0.reshape(1), t0 * (1 - frac)])


@torch.no_grad()
def rms(denoiser_for, solver: LinearSolver, z: Tensor, target: Tensor, batch: int = 1024) -> float:
    """Endpoint RMS error of ``solver`` against ``target`` over all samples and coordinates."""
    se = 0.0
    for lo in range(0, len(z), batch):
        idx = torch.arange(lo, min(lo + batch, len(z)))
        out = rollout(denoiser_for(idx), solver.C, solver.ts, z[lo:lo + batch])
        se += float((out - target[lo:lo + batch]).double().pow(2).sum())
    return math.sqrt(se / target.numel())


def save(path, solver: LinearSolver) -> None:
    """Atomically write ``{"ts", "C"}`` and the JSON metadata as a safetensors file."""
    from safetensors.torch import save_file

    from diffx.atomic import atomic_write

    tensors = {"ts": solver.ts.double().contiguous().cpu(), "C": solver.C.double().contiguous().cpu()}
    metadata = {"format": FORMAT, "meta": json.dumps(solver.meta, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load(path) -> LinearSolver:
    """Read and check a file written by ``save``; every problem is a one-line ``DiffxError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DiffxError(f"sampler.path={path}: no such file (expected a solver from `diffx calibrate`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header.get("meta", "{}"))
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the user's input, named in one line
        raise DiffxError(f"sampler.path={path}: not a readable solver file ({type(e).__name__})") from None
    ts, C = tensors.get("ts"), tensors.get("C")
    n = -1 if ts is None else len(ts)
    ok = (header.get("format") == FORMAT and isinstance(meta, dict) and ts is not None and C is not None
          and ts.ndim == 1 and n > 0 and tuple(C.shape) == (n + 1, n + 1)
          and bool(torch.isfinite(C).all()) and bool(((ts > 0) & (ts <= 1)).all())
          and bool((C.triu(1) == 0).all()))
    if not ok:
        raise DiffxError(f"sampler.path={path}: not a diffx solver file (expected format {FORMAT}: ts of n times "
                         "in (0, 1] and a lower-triangular (n+1, n+1) C)")
    return LinearSolver(ts.double(), C.double(), meta)

