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
from diffx.samplers import guard, multistep
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
            return guard.run(lambda d, _, z, call_ts: rollout(d, self.C, call_ts, z), denoise, schedule, x,
                             self.ts if ts is None else ts, name=self.name)


def rollout(denoise, C: Tensor, ts: Tensor, z: Tensor) -> Tensor:
    """Run the linear sampler ``C`` over call times ``ts`` from noise ``z`` (differentiable in C, ts)."""
    return points(denoise, C, ts, z)[-1]


def points(denoise, C: Tensor, ts: Tensor, z: Tensor) -> list[Tensor]:
    """``[x_0, ..., x_{n-1}, x_n]``: the query points of ``rollout`` (x_i is where the model is called at
    ``ts[i]``) and its output."""
    feats, xs = [z], []
    for i in range(len(ts)):
        xs.append(_combine(C[i], feats))
        feats.append(denoise(xs[-1], ts[i])[0])
    return xs + [_combine(C[len(ts)], feats)]


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

    basis.checked = True  # coefficient vectors, not states: no divergence guard (diffx.samplers.guard)
    z = torch.zeros(1, n_max + 1, dtype=torch.float64)
    z[0, 0] = 1.0
    out = sampler(basis, schedule, z, ts, generator=torch.Generator().manual_seed(seed))
    n = len(calls)
    C = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for i, (_, row) in enumerate(calls):
        C[i] = row[: n + 1]
    C[n] = out[0, : n + 1]
    return torch.tensor([t for t, _ in calls], dtype=torch.float64), C


# sigma / alpha of the reference solve's last model call: far below any trained noise level, so that the
# solve ends at the ODE's endpoint at t = 0 and not at a denoiser estimate (see ``reference``).
REFERENCE_SIGMA_END = 1e-5


@torch.no_grad()
def reference(denoise, schedule, z: Tensor, steps: int = 200) -> Tensor:
    """The model's own probability-flow ODE endpoint at t = 0 from ``z``, to high accuracy: UniPC order 3
    (4th order with its corrector, Zhao et al. 2023) on ``steps`` log-SNR-uniform steps (``reference_grid``).

    The grid runs on below the smallest trained noise level (DDPM-linear: sigma/alpha = 0.01 at t = 1/N),
    down to ``REFERENCE_SIGMA_END``. Stopping at that level, as the samplers do, would give the denoiser's
    estimate x0_hat there instead of the endpoint; for a mixture component of std c it misses by about
    ``s^2 / (2 c^2)`` times the sample's distance from the component mean: 9.7e-4 RMS on the 64-D benchmark
    mixture (ddpm-linear, c = 0.05), a floor no fit to such a reference could get under. (Below that level a
    trained network is queried where it was not trained; with eps, v or velocity prediction x0_hat there
    hardly depends on its output, which is scaled by sigma.) With the grid below,
    the reference is within 2e-5 RMS (max 3e-4) of a DOP853 solve on that mixture at 200 steps, 2e-6
    at 400 (``python scripts/bench_samplers.py --check-reference``)."""
    return multistep.unipc(denoise, schedule, z, reference_grid(steps, schedule), order=3)


def reference_grid(steps: int, schedule) -> Tensor:
    """``steps`` log-SNR-uniform steps from ``sigma/alpha = min(grids.SIGMA_MAX, its value at t = 1)``
    (first point moved to t = 1) to ``REFERENCE_SIGMA_END``, then t = 0: ``grids.logsnr`` without its
    stop at the schedule's smallest trained noise level."""
    (a1, s1), = schedule.table(torch.ones(1, dtype=torch.float64))
    s_max = min(grids.SIGMA_MAX, s1 / a1) if a1 > 0 else grids.SIGMA_MAX
    lam = torch.linspace(-math.log(s_max), -math.log(REFERENCE_SIGMA_END), steps, dtype=torch.float64)
    ts = schedule.t_of_lambda(lam)
    ts[0] = 1.0
    return torch.cat([ts, ts.new_zeros(1)])


TRAJECTORY_EVERY = 8  # ``trajectory`` records every 8th call of the reference solve: 25 nodes of 200 steps


@dataclass
class Trajectory:
    """The reference ODE solution of N noises at K of its model calls, for the solver's intermediate
    states to be compared with at any time in between (``fit``'s ``path_weight``). Stored in the
    variance-preserving form of the path, ``v = x / sqrt(alpha^2 + sigma^2)`` over the half log-SNR
    ``lambda`` (the same curve for every schedule): ``lam`` (K,) increasing, ``v`` (N, K, ...) and its
    slope ``dv`` = dv/dlambda = a x0_hat - a^2 v with ``a = alpha / sqrt(alpha^2 + sigma^2)`` (the
    PF-ODE ``dy/dlambda = x0_hat - y`` of ``y = x / alpha``, Lu et al. 2022, rewritten in v), so that
    ``at`` interpolates it with a cubic Hermite spline: smooth, and v -> the noise as lambda -> -inf."""

    schedule: object
    lam: Tensor
    v: Tensor
    dv: Tensor

    def at(self, t: Tensor, rows: Tensor) -> Tensor:
        """The reference state ``x(t)`` of pool ``rows`` at the 0-dim time ``t``, differentiable in ``t``
        (lambda outside the recorded range is clamped to its ends)."""
        alpha, sigma = self.schedule.alpha_sigma(t.reshape(1).to(torch.float64))
        lam = (alpha.log() - sigma.log()).clamp(self.lam[0], self.lam[-1])
        k = (torch.searchsorted(self.lam, lam.detach()) - 1).clamp(0, len(self.lam) - 2)  # interval [k, k + 1]
        h = self.lam[k + 1] - self.lam[k]
        u = (lam - self.lam[k]) / h
        h00, h10, h01, h11 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u, 3 * u**2 - 2 * u**3, u**3 - u**2
        ends = torch.cat([k, k + 1])
        v, dv = self.v[rows[:, None], ends], self.dv[rows[:, None], ends]  # (B, 2, ...)
        y = h00 * v[:, 0] + h10 * h * dv[:, 0] + h01 * v[:, 1] + h11 * h * dv[:, 1]
        return ((alpha**2 + sigma**2).sqrt() * y).to(self.v.dtype)


@torch.no_grad()
def trajectory(denoise, schedule, z: Tensor, steps: int = 200) -> Trajectory:
    """``reference``'s solve from ``z``, recorded at every ``TRAJECTORY_EVERY``-th model call after the
    first (at t = 1, where lambda may be -inf): the model's own state and x0_hat there."""
    nodes: list[tuple[float, Tensor, Tensor]] = []
    calls = [0]

    def record(x: Tensor, t):
        x0, noise = denoise(x, t)
        if calls[0] > 0 and calls[0] % TRAJECTORY_EVERY == 1 % TRAJECTORY_EVERY:
            nodes.append((float(t), x, x0))
        calls[0] += 1
        return x0, noise

    multistep.unipc(record, schedule, z, reference_grid(steps, schedule), order=3)
    ab = torch.tensor(schedule.table(torch.tensor([t for t, _, _ in nodes], dtype=torch.float64)), dtype=torch.float64)
    r = ab.pow(2).sum(1).sqrt()  # (K,) sqrt(alpha^2 + sigma^2)
    a = (ab[:, 0] / r).to(z.dtype).reshape(1, -1, *([1] * (z.ndim - 1)))  # (1, K, 1...)
    v = torch.stack([x / rk for (_, x, _), rk in zip(nodes, r.tolist())], 1)  # (N, K, ...)
    x0 = torch.stack([x0 for _, _, x0 in nodes], 1)
    return Trajectory(schedule, (ab[:, 0].log() - ab[:, 1].log()).to(z.device), v, a * x0 - a * a * v)


METHODS = ("joint", "staged", "lbfgs")


def fit(denoiser_for, solver: LinearSolver, z: Tensor, target: Tensor, iters: int = 500, lr: float = 1e-3,
        t_lr: float = 1e-2, batch: int = 1024, seed: int = 0, learn_times: bool = True, val=None,
        on_step=None, check_every: int = 0, method: str = "joint", path: Trajectory | None = None,
        path_weight: float = 0.0, freeze: float = 0.0) -> LinearSolver:
    """Fit ``C`` and the call times to ``mean |rollout(z) - target|^2`` on the calibration pool (z, target),
    from ``solver`` (usually ``trace`` of a classical sampler). ``method``:

    - ``joint``: Adam on mini-batches, coefficients at ``lr`` and times at ``t_lr`` together, with a
      linear warm-up over the first 5% of the steps and a cosine decay after it;
    - ``staged``: the same Adam in two halves, the call times alone first (LD3, Tong et al. 2024), then
      the coefficients at ``lr / 3`` with the times at ``t_lr / 10`` (S4S's order, Frankel et al. 2025):
      the times move the most for the least risk, and the coefficients only refine what they leave;
    - ``lbfgs``: L-BFGS with a strong-Wolfe line search on one fixed batch of ``batch`` noises,
      ``iters`` iterations (a deterministic loss, so no learning rate to tune).

    ``path`` (``trajectory`` of the pool) and ``path_weight`` > 0 add ``path_weight`` times the mean over
    the query points x_1..x_{n-1} of ``mean |x_i - x_ref(t_i)|^2``, the reference ODE state at the solver's
    call time: a few-step solver decides early which mode a sample goes to, and the endpoint loss sees that
    only through the rare samples that already went wrong (their gradient comes from the other side of a
    mode boundary); the path loss fits the early steps on every sample.

    ``freeze``: the share of the first calls whose query points and call times stay the solver's (rounded to
    a count): those early, high-noise steps decide which mode a sample ends in, so a fit of the later steps,
    the output and their times alone repairs the typical sample's error (mostly the last steps'
    extrapolation) while leaving the base's mode decisions, and so its flips, as they were.

    ``val = (val_denoiser_for, z_val, target_val)``: noises kept out of the fit. At every check (below) the
    current solver is scored on them and the one with the lowest RMS among those that also beat ``solver``'s
    mean per-sample error is kept: the result is that one (early stopping: on multi-modal data a step that
    repairs a few mode flips of the batch can add others, and at 20 NFE the late steps that repair flips can
    cost the typical sample more than they gain), or ``solver`` itself if no checked solver was more accurate
    there on both -- a fit that went astray never makes sampling worse (the rule of ``diffx.samplers.calibration``'s
    guard, so that what early stopping keeps is what the guard can accept).

    Parameters: a lower-triangular correction to C and, with ``learn_times`` (call times strictly
    decreasing), the call times, as a softmax over the n gaps ``t_0 - t_1, ..., t_{n-1} - 0``, so they
    stay ordered, inside (0, t_0] and start exactly where the solver's do. ``denoiser_for(idx)`` is the
    denoiser for pool rows ``idx`` (their conditions); its ``denoise(x, t)`` must accept a 0-dim tensor
    ``t`` and be differentiable in ``x`` (and in ``t`` for the times). Every ``check_every`` steps
    (default: a tenth of them) and at the last, the loss is read back -- the only host sync of the
    loop --, checked for NaN/inf and passed to ``on_step(i, loss)``.
    """
    if method not in METHODS:
        raise DiffxError(f"method={method}: expected one of {', '.join(METHODS)}")
    if not 0 <= freeze < 1:
        raise DiffxError(f"freeze={freeze}: expected a share of the calls in [0, 1), e.g. 0.5 (0 fits them all)")
    if path_weight > 0 and path is None:
        raise DiffxError("path_weight > 0 needs path= (learned.trajectory of the calibration noises)")
    params = _Params(solver, learn_times, round(freeze * solver.steps))
    check_every = check_every or max(1, iters // 10)
    g = torch.Generator().manual_seed(seed)

    def loss_on(idx: Tensor) -> Tensor:
        rows, ts = idx.to(z.device), params.ts()
        xs = points(denoiser_for(idx), params.C(), ts, z[rows])
        loss = (xs[-1] - target[rows]).double().pow(2).mean()
        if path_weight > 0 and len(ts) > 1:
            off = [(xs[i] - path.at(ts[i], rows)).double().pow(2).mean() for i in range(1, len(ts))]
            loss = loss + path_weight * torch.stack(off).mean()
        return loss

    def check(candidate: LinearSolver) -> tuple[float, float]:  # (global RMS, mean per-sample RMS) on val
        se = sample_errors(val[0], candidate, val[1], val[2], batch)
        return se.mean().sqrt().item(), se.sqrt().mean().item()

    start = (math.inf, math.inf) if val is None else check(solver)
    kept = [start[0], solver]  # [val RMS, solver]

    def report(i: int, loss: Tensor) -> None:
        if (i + 1) % check_every == 0 or i + 1 == iters:
            value = loss.item()
            if not math.isfinite(value):
                raise DiffxError(f"the solver fit diverged by step {i + 1} (loss {value}); lower lr= / t_lr=")
            if on_step is not None:
                on_step(i, value)
            if val is not None:
                current = params.solver(solver.meta)
                err, mean = check(current)
                if err < kept[0] and mean < start[1]:
                    kept[:] = [err, current]

    if method == "lbfgs":
        _lbfgs(params, loss_on, torch.randperm(len(z), generator=g)[:batch], iters, report)
    else:
        stages = [(iters, lr, t_lr)] if method == "joint" else [(iters // 2, 0.0, t_lr), (iters - iters // 2, lr / 3, t_lr / 10)]
        done = 0
        for n, c_rate, t_rate in stages:
            _adam(params, loss_on, len(z), batch, g, n, c_rate, t_rate, lambda i, loss: report(done + i, loss))
            done += n
    return params.solver(solver.meta) if val is None else kept[1]


class _Params:
    """What ``fit`` tunes: ``dC`` (masked lower-triangular) and the log-gaps ``u`` of the call times after
    the ``frozen`` first calls (whose query points and times stay the solver's; the first time always does)."""

    def __init__(self, solver: LinearSolver, learn_times: bool, frozen: int = 0):
        self.ts0, self.C0 = solver.ts.to(torch.float64), solver.C.to(torch.float64)
        self.k = max(1, min(frozen, len(self.ts0)))  # calls whose time stays: at least the first
        gaps = self.ts0 - torch.cat([self.ts0[1:], self.ts0.new_zeros(1)])
        self.learn_times = learn_times and bool((gaps > 0).all()) and self.k < len(self.ts0)
        self.mask = torch.tril(torch.ones_like(self.C0))
        self.mask[:frozen] = 0  # the frozen calls' query points
        self.dC = torch.zeros_like(self.C0, requires_grad=True)
        self.u = gaps[self.k - 1:].log().clone().requires_grad_(self.learn_times)

    def C(self) -> Tensor:
        return self.C0 + self.dC * self.mask

    def ts(self) -> Tensor:
        if not self.learn_times:
            return self.ts0
        return torch.cat([self.ts0[:self.k], _times(self.ts0[self.k - 1], self.u)[1:]])

    def groups(self, c_rate: float, t_rate: float) -> list[dict]:
        return ([{"params": [self.dC], "lr": c_rate}] if c_rate > 0 else []) + \
            ([{"params": [self.u], "lr": t_rate}] if self.learn_times and t_rate > 0 else [])

    def solver(self, meta: dict) -> LinearSolver:
        with torch.no_grad():
            return LinearSolver(self.ts().detach().clone(), self.C().detach().clone(), dict(meta))


def _adam(params: _Params, loss_on, pool: int, batch: int, g, iters: int, c_rate: float, t_rate: float, report) -> None:
    """Adam on mini-batches, warm-up over the first 5% of the steps, cosine decay after it."""
    groups = params.groups(c_rate, t_rate)
    if not groups or iters <= 0:
        return
    opt = torch.optim.Adam(groups)
    warm = max(1, iters // 20)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(math.pi * i / iters))))
    for i in range(iters):
        loss = loss_on(torch.randperm(pool, generator=g)[:batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        report(i, loss.detach())


def _lbfgs(params: _Params, loss_on, idx: Tensor, iters: int, report) -> None:
    """L-BFGS (Nocedal 1980) with a strong-Wolfe line search on one fixed batch ``idx``."""
    groups = params.groups(1.0, 1.0)
    if not groups or iters <= 0:
        return
    opt = torch.optim.LBFGS([p for grp in groups for p in grp["params"]], lr=1.0, max_iter=iters,
                            max_eval=iters * 5 // 4, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)
    evals = [0]

    def closure():
        opt.zero_grad()
        loss = loss_on(idx)
        loss.backward()
        if evals[0] < iters:
            report(evals[0], loss.detach())
        evals[0] += 1
        return loss

    opt.step(closure)


def _times(t0: Tensor, u: Tensor) -> Tensor:
    """Call times from gap logits: ``t_i = t_0 (1 - sum_{k < i} softmax(u)_k)``, i = 0..n-1."""
    frac = torch.cumsum(torch.softmax(u, 0), 0)[:-1]
    return torch.cat([t0.reshape(1), t0 * (1 - frac)])


def rms(denoiser_for, solver: LinearSolver, z: Tensor, target: Tensor, batch: int = 1024) -> float:
    """Endpoint RMS error of ``solver`` against ``target`` over all samples and coordinates."""
    return sample_errors(denoiser_for, solver, z, target, batch).mean().sqrt().item()


@torch.no_grad()
def sample_errors(denoiser_for, solver: LinearSolver, z: Tensor, target: Tensor, batch: int = 1024) -> Tensor:
    """(N,) per-sample mean squared endpoint error of ``solver`` against ``target``, on the CPU;
    ``denoiser_for(idx)`` for rows ``idx`` of ``z``."""
    out = []
    for lo in range(0, len(z), batch):
        idx = torch.arange(lo, min(lo + batch, len(z)))
        x = rollout(denoiser_for(idx), solver.C, solver.ts, z[lo:lo + batch])
        out.append((x - target[lo:lo + batch]).double().flatten(1).pow(2).mean(1).cpu())
    return torch.cat(out)


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

