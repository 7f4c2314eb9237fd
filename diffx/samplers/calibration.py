"""Calibration as a library call: fit a sampler to any model held in Python (``diffx calibrate`` calls it).

    from diffx.samplers import calibration
    found = calibration.calibrate(denoise, schedule, noise_shape=(3, 16, 16), steps=[5, 10, 20])
    found[10].solver        # a LinearSolver, a sampler like the others; learned.save(path, found[10].solver)

For each NFE budget: every deterministic sampler x grid (``BASES`` x ``diffx.samplers.auto.GRIDS``) is
traced into its linear form and scored (one solve each) on every noise the fit may see -- the fit's and
the validation noises: no base is tuned, so none is favoured, and the rare mode flips that carry the
RMS need thousands of noises to be counted --, and ``best`` picks one; the fit (``learned.fit``) starts
from it; and the guard keeps the fit only if it beats that base on the validation noises on both the
mean per-sample error and the global RMS, and does so in at least ``CONFIDENCE`` of paired bootstrap
draws of them (``confidence``: a gain carried by one or two mode flips is not a gain). With several
``freeze`` shares or fit ``method``s, one fit is made from each pair and the guard's survivor with the lowest
per-sample mean error on the validation noises is kept.
So the result is never worse there than the best untuned sampler at that NFE. With several budgets, the next smaller
budget's result (whose samples an embedding into this budget's calls, ``diffx.samplers.embedding``, gives
exactly) is kept where it beats this budget's kept solver on the validation
noises: the results are monotone in NFE there, by construction. The reference solves (the costly part) are shared
by all budgets. The global RMS is carried by the few samples whose trajectory ends in another mode
(README, Samplers); the per-sample mean and median much less, so all three are reported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from diffx.errors import DiffxError
from diffx.samplers import auto, learned
from diffx.samplers.plan import name_of, steps_for_nfe

# The deterministic samplers calibration starts from (name, options), on every grid of auto.GRIDS.
BASES = [("ddim", {}), ("heun", {}), ("dpmpp", {}), ("dpmpp_3m", {}), ("unipc", {}), ("unipc", {"order": 3}),
         ("ipndm", {})]


OUTLIER = 10.0  # a sample whose error is this many times the median per-sample error counts in ``Score.tail``


@dataclass(frozen=True)
class Score:
    """Endpoint errors against the reference over a pool: global RMS; the mean and median of the
    per-sample RMS (robust to the few samples that end in another mode); and ``tail``, the part of the
    RMS carried by samples more than ``OUTLIER`` x the median off -- the mode flips: ``sqrt(sum of their
    squared errors / all)``, so ``rms^2 - tail^2`` is what the typical samples carry."""

    rms: float
    mean: float
    median: float
    tail: float = 0.0
    errors: Tensor | None = field(default=None, compare=False, repr=False)  # (N,) per-sample mean squared errors

    def beats(self, other: "Score") -> bool:
        """Better on the per-sample mean and not worse on the global RMS: the guard's rule."""
        return self.mean < other.mean and self.rms <= other.rms

    def __str__(self) -> str:
        return f"RMS {self.rms:.3e} (flips {self.tail:.1e}), per-sample mean {self.mean:.3e}, median {self.median:.3e}"


# The default share of frozen first calls (``learned.fit``'s ``freeze``): at the demo model's CPU budget the fit of
# every call lost on fresh noises on all three seeds (1.03-1.24x RMS), the later half's gained on all three
# (0.92-0.97x); README, Samplers. scripts/bench_samplers.py fits all calls unless told (--calib-freeze).
FREEZE = 0.5
CONFIDENCE = 0.9  # the guard's default: the fit must beat its base in this share of bootstrap draws


def freezes(freeze) -> tuple[float, ...]:
    """``freeze`` (a share, or several to fit each and keep the best that passes the guard) as sorted shares,
    each in [0, 1); a one-line ``DiffxError`` otherwise."""
    values = list(freeze) if isinstance(freeze, (list, tuple)) else [freeze]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values):
        raise DiffxError(f"freeze={freeze}: expected a share of the calls in [0, 1), e.g. 0.5 (0 fits them all), "
                         "or a list of them, e.g. [0,0.5]")
    return tuple(sorted(set(float(v) for v in values)))


def methods(method) -> tuple[str, ...]:
    """``method`` (one of ``learned.METHODS``, or several to fit each and keep the best that passes the guard) as a
    tuple in the order given; a one-line ``DiffxError`` otherwise."""
    values = list(method) if isinstance(method, (list, tuple)) else [method]
    if not values or not all(isinstance(v, str) and v in learned.METHODS for v in values):
        raise DiffxError(f"method={method}: expected one of {', '.join(learned.METHODS)}, or a list of them, "
                         "e.g. [joint,lbfgs]")
    return tuple(dict.fromkeys(values))


def confidence(a: Score, b: Score, draws: int = 1000, seed: int = 0) -> float:
    """The share of ``draws`` paired bootstrap resamples of the noises (Efron 1979; the same resampled noises
    for both) on which ``a`` beats ``b`` (``Score.beats``). Where a few mode flips carry the global RMS (e.g.
    a fit scored on 128 validation noises), an RMS gain that rests on one or two samples wins about as many
    draws as it loses; a gain spread over the pool wins nearly all. Needs both scores' ``errors``."""
    if a.errors is None or b.errors is None or len(a.errors) != len(b.errors):
        raise DiffxError("confidence needs two scores of the same noises, with their per-sample errors")
    g = torch.Generator().manual_seed(seed)
    wins = 0
    for lo in range(0, draws, 100):
        idx = torch.randint(len(a.errors), (min(100, draws - lo), len(a.errors)), generator=g)
        ea, eb = a.errors[idx], b.errors[idx]  # (draws, N) squared errors of the same resampled noises
        wins += int(((ea.sqrt().mean(1) < eb.sqrt().mean(1)) & (ea.mean(1) <= eb.mean(1))).sum())
    return wins / draws


NEAR = 1.25  # ``best``'s rule, and that of sampler=auto's table (scripts/bench_samplers.py --defaults)


def best(scores: dict[str, Score]) -> str:
    """The key of ``scores`` to fit from: among those within ``NEAR`` x the lowest global RMS, the one whose
    mode flips carry the least of it (``Score.tail``), then the lowest per-sample mean. The fit repairs the
    typical error well (a smooth function of the coefficients: mostly the last steps' extrapolation) but
    hardly the flips (a sample near a mode boundary crosses it or not), and on fresh noises the RMS is set
    by the flip rate. So of near-equal bases the one that flips least is the better start -- e.g. at 10 NFE
    on the 64-D benchmark, unipc order=3 on ``uniform`` (24 flips in 16,384, median error 4.3e-2) rather
    than on ``logsnr`` (94 flips, median 1.2e-2), from which the fit falls to half the RMS, not above it."""
    lowest = min(s.rms for s in scores.values())
    return min((k for k, s in scores.items() if s.rms <= NEAR * lowest), key=lambda k: (scores[k].tail, scores[k].mean))


@dataclass
class Calibration:
    """One budget's result: ``solver`` (the fit, or the best base where the fit did not win, or the smaller
    budget's result where that beat both), which ``kept`` (``fit`` / ``base`` / ``smaller``), the ``base`` it
    started from, and ``scores[pool][which]`` with pool ``validation`` / ``holdout`` and which ``base`` / ``fit``
    (/ ``smaller``); ``candidates``: every base's score on the fit's and the validation noises together (what
    ``best`` chose by). A ``solver`` kept from a smaller budget keeps its own, smaller number of calls."""

    solver: learned.LinearSolver
    base: str
    kept: str
    scores: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)
    confidence: float = 0.0  # the share of bootstrap draws of the validation noises in which the fit beat its base
    freeze: float | None = None  # the ``freeze`` of the fit in ``scores`` (of several, the one chosen); None: no fit
    method: str | None = None  # the ``method`` of that fit
    fits: dict = field(default_factory=dict)  # every fit's {(method, freeze): (validation Score, confidence)}


def bases(schedule, nfe: int, choices=None) -> dict[str, learned.LinearSolver]:
    """``{"unipc order=3 on logsnr": traced solver}`` for each base x grid at ``nfe`` network calls.
    ``choices``: ``[(label, sampler, grid)]`` instead of all of ``BASES`` x ``auto.GRIDS``."""
    if choices is None:
        choices = [(f"{name}{''.join(f' {k}={v}' for k, v in opts.items())} on {gname}",
                    functools.partial(auto.SAMPLERS[name], **opts), grid)
                   for name, opts in BASES for gname, grid in auto.GRIDS.items()]
    out = {}
    for label, sampler, grid in choices:
        steps = steps_for_nfe(sampler, nfe, grid, schedule)
        solver = learned.trace(sampler, schedule, grid(steps, schedule))
        if solver.steps == nfe:  # Heun cannot spend an even budget exactly: it competes where it can
            solver.meta.update(base=name_of(sampler), grid=name_of(grid), steps=steps, label=label)
            out[label] = solver
    return out


@torch.no_grad()
def score(denoiser_for, solver: learned.LinearSolver, z: Tensor, target: Tensor, batch: int = 256) -> Score:
    """``Score`` of ``solver`` on noises ``z`` against ``target``; ``denoiser_for(idx)`` for rows of ``z``."""
    se = learned.sample_errors(denoiser_for, solver, z, target, batch)  # (N,) per-sample mean squared error
    median = se.sqrt().median()
    tail = torch.where(se.sqrt() > OUTLIER * median, se, 0.0).mean().sqrt()
    return Score(se.mean().sqrt().item(), se.sqrt().mean().item(), median.item(), tail.item(), se)


def check_time_gradient(denoise, x: Tensor, t: float = 0.4321, h: float = 1e-4) -> None:
    """Raise a one-line ``DiffxError`` if ``denoise``'s x0_hat changes with ``t`` (central finite
    difference) but autograd sees no such change: a model that takes ``t`` through ``.item()``, a
    Python float or an integer lookup gives the fit no gradient for the call times."""
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x)
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        f = (denoise(x, tt)[0] * probe).sum()
        grad, = torch.autograd.grad(f, tt, allow_unused=True)
    with torch.no_grad():
        fd = ((denoise(x, t + h)[0] * probe).sum() - (denoise(x, t - h)[0] * probe).sum()).item() / (2 * h)
    auto_grad = 0.0 if grad is None else grad.item()
    if abs(fd) > 1e-6 * (1 + abs(f.item())) and abs(auto_grad - fd) > 0.5 * abs(fd):
        raise DiffxError(f"learn_times=true: the model's output changes with t (finite difference {fd:.3g}) but "
                         f"the gradient reaching t is {auto_grad:.3g}; the model must take t as a tensor "
                         "without .item() or int(), or pass learn_times=false")


def calibrate(denoise, schedule, noise_shape=None, steps=(10,), *, noise: Tensor | None = None,
              target: Tensor | None = None, denoiser_for: Callable | None = None, samples: int = 1024, validation: int = 256, holdout: int = 256,
              reference_steps: int = 200, choices=None, method: str | Sequence[str] = "joint", iters: int = 500,
              lr: float = 1e-3, t_lr: float = 1e-2, batch: int = 256, learn_times: bool = True, seed: int = 0,
              path_weight: float = 0.0, freeze: float | Sequence[float] = FREEZE, confidence: float = CONFIDENCE,
              log: Callable[[str], None] | None = None) -> dict[int, Calibration]:
    """Fit a solver at each NFE of ``steps`` to the model behind ``denoise`` (``denoise(x, t) ->
    (x0_hat, noise_hat)``, differentiable in x, and in t to fit the times).

    ``noise``: the ``samples + validation + holdout`` start noises (the fit's first, validation, holdout
    last); default: standard normal of ``noise_shape`` from ``seed``. ``target``: their reference ODE endpoints,
    if already solved (``learned.reference``; another fit of the same pool). ``denoiser_for(idx)``: the denoiser
    for rows ``idx`` of the pool (per-row conditions); default ``denoise`` for all. ``choices``: the
    bases to try, ``[(label, sampler, grid)]`` (default: ``BASES`` x ``auto.GRIDS``). ``confidence``: the guard
    keeps the fit only if it beats its base on the validation noises in at least this share of paired bootstrap
    draws (``confidence()``; 0: whenever it beats it there). ``freeze``: ``learned.fit``'s share of frozen first
    calls, or several (e.g. ``[0, 0.5]``); ``method``: ``learned.fit``'s, or several (e.g. ``["joint", "lbfgs"]``):
    one fit for each method and share, and of those that pass the guard the one with the lowest per-sample mean
    error on the validation noises is kept (``Calibration.method`` and ``.freeze``; every fit's score in
    ``Calibration.fits``). The rest is ``learned.fit``'s; with ``path_weight``
    > 0 the fit noises' reference solves are also recorded along the way (``learned.trajectory``, one more
    solve of each) for its loss on the intermediate states. Returns ``{nfe: Calibration}``."""
    log = log or (lambda msg: None)
    denoiser_for = denoiser_for or (lambda idx: denoise)
    total = samples + validation + holdout
    if noise is None:
        if noise_shape is None:
            raise DiffxError("calibrate needs noise_shape= (one sample's shape) or noise=")
        noise = torch.randn((total, *noise_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if not 0 <= confidence < 1:
        raise DiffxError(f"confidence={confidence}: expected a share in [0, 1), e.g. 0.9 (0 keeps any fit that wins)")
    freeze, method = freezes(freeze), methods(method)  # a bad one fails before the reference solves
    if len(noise) != total:
        raise DiffxError(f"noise has {len(noise)} rows; expected samples + validation + holdout = {total}")
    if learn_times and iters > 0:
        check_time_gradient(denoiser_for(torch.arange(min(2, total))), noise[:min(2, total)])
    if target is None:
        target = references(denoiser_for, schedule, noise, reference_steps, batch)
        log(f"reference: {total} ODE solves at {reference_steps} steps")
    path = None
    if path_weight > 0 and iters > 0:
        path = trajectories(denoiser_for, schedule, noise[:samples], reference_steps, batch)
        log(f"trajectory: {samples} ODE solves recorded at {len(path.lam)} points")
    pools = {name: _pool(denoiser_for, noise, target, lo, hi) for name, (lo, hi) in
             {"fit": (0, samples), "validation": (samples, samples + validation),
              "selection": (0, samples + validation), "holdout": (samples + validation, total)}.items()}
    out = {}
    for nfe in sorted(set(int(n) for n in steps)):
        smaller = out[max(out)] if out and choices is None else None  # the next smaller budget's result
        out[nfe] = _one_budget(schedule, nfe, pools, choices, batch, log,
                               dict(iters=iters, lr=lr, t_lr=t_lr, batch=batch, seed=seed, learn_times=learn_times,
                                    method=method, path=path, path_weight=path_weight, freeze=freeze), smaller,
                               confidence)
    return out


def references(denoiser_for, schedule, noise: Tensor, steps: int = 200, batch: int = 256) -> Tensor:
    """``learned.reference`` endpoints of every row of ``noise``, ``batch`` rows at a time."""
    return torch.cat([learned.reference(denoiser_for(torch.arange(lo, min(lo + batch, len(noise)))), schedule,
                                        noise[lo:lo + batch], steps) for lo in range(0, len(noise), batch)])


def trajectories(denoiser_for, schedule, noise: Tensor, steps: int = 200, batch: int = 256) -> learned.Trajectory:
    """``learned.trajectory`` of every row of ``noise``, ``batch`` rows at a time, as one ``Trajectory``."""
    parts = [learned.trajectory(denoiser_for(torch.arange(lo, min(lo + batch, len(noise)))), schedule,
                                noise[lo:lo + batch], steps) for lo in range(0, len(noise), batch)]
    return learned.Trajectory(schedule, parts[0].lam, torch.cat([p.v for p in parts]), torch.cat([p.dv for p in parts]))


def _pool(denoiser_for, noise: Tensor, target: Tensor, lo: int, hi: int) -> tuple:
    rows = torch.arange(lo, hi)
    return (lambda idx: denoiser_for(rows[idx])), noise[lo:hi], target[lo:hi]


def _one_budget(schedule, nfe: int, pools: dict, choices, batch: int, log, fit_options: dict,
                smaller: Calibration | None = None, level: float = CONFIDENCE) -> Calibration:
    """Score every base on the fit's and validation noises, fit from the ``best``, keep the better of the two.

    ``smaller``: the result at a smaller budget. Where it beats the kept solver on the validation noises
    (``Score.beats``; its own scores there: embedded into ``nfe`` calls, ``embedding.embed``, it gives the same
    samples) it is kept
    instead (``kept="smaller"``), as its own m-call solver: a budget's result is then never worse there than
    the smaller budget's. It is not a base to fit from: fitted on the fit's noises and chosen on the validation
    ones, it looks best to ``best`` there; offered as one, on the 64-D benchmark it was chosen at ddpm-cosine
    10 NFE, the fit from it did not pass the guard (71% of draws), and the 5-NFE solver was left (3.2e-2 RMS on
    fresh noises, against 1.9e-2 for the fit from the best untuned base)."""
    sel_for, sel_z, sel_target = pools["selection"]
    candidates = {label: (solver, score(sel_for, solver, sel_z, sel_target, batch))
                  for label, solver in bases(schedule, nfe, choices).items()}
    if not candidates:
        raise DiffxError(f"steps={nfe}: no deterministic base sampler spends exactly {nfe} network calls")
    label = best({k: v[1] for k, v in candidates.items()})
    base = candidates[label][0]
    log(f"{nfe} NFE: best base on {len(sel_z)} noises {label} ({candidates[label][1]}) of {len(candidates)}")
    val_for, val_z, val_target = pools["validation"]
    base_val = score(val_for, base, val_z, val_target, batch)
    fit_for, fit_z, fit_target = pools["fit"]

    def step_log(i, loss):
        log(f"{nfe} NFE: fit {i + 1}/{fit_options['iters']}  train RMS {loss ** 0.5:.3e}")

    fits = {}  # (method, freeze) -> (fitted solver, its validation score, share of bootstrap draws beating the base)
    recipes = [(m, f) for m in fit_options["method"] for f in fit_options["freeze"]] if fit_options["iters"] > 0 else []
    for method, share in recipes:  # calibrate's ``methods`` x ``freezes``
        fitted = learned.fit(fit_for, base, fit_z, fit_target, on_step=step_log, val=pools["validation"],
                             **{**fit_options, "method": method, "freeze": share})
        fit_val = score(val_for, fitted, val_z, val_target, batch)
        fits[method, share] = (fitted, fit_val, confidence(fit_val, base_val))
        log(f"{nfe} NFE: fit (method={method}, freeze={share:g}) on the validation noises: {fit_val}; beats {label} "
            f"in {fits[method, share][2]:.0%} of bootstrap draws")
    # The guard, per fit; of the fits that pass it, the lowest per-sample mean on the validation noises (then RMS):
    # past the guard, the RMS difference between two fits is a few mode flips, which 8,192 validation noises
    # count too noisily to rank them by (on the 64-D benchmark it picked the worse of two fits on fresh noises,
    # while the mean picked the better in every cell; README, Samplers)
    passing = [f for f, (_, s, sure) in fits.items() if s.beats(base_val) and sure >= level]
    chosen = min(passing or fits, key=lambda f: (fits[f][1].mean, fits[f][1].rms), default=None)
    fitted, fit_val, sure = fits[chosen] if fits else (base, base_val, 0.0)
    kept = "fit" if passing else "base"
    if fit_val.beats(base_val) and kept == "base":
        log(f"{nfe} NFE: the fit beats {label} on the validation noises in {sure:.0%} of bootstrap draws, "
            f"under confidence={level:g}: the base is kept")
    held_for, held_z, held_target = pools["holdout"]
    solvers = {"base": base, "fit": fitted}
    scores = {"validation": {"base": base_val, "fit": fit_val}}
    if smaller is not None and smaller.solver.steps < nfe:
        # The same noises as this budget's, so its scores stand as they are (embedded into this budget's calls,
        # ``embedding.embed``, it gives the same samples)
        solvers["smaller"] = smaller.solver
        scores["validation"]["smaller"] = smaller.scores["validation"][smaller.kept]
        if scores["validation"]["smaller"].beats(scores["validation"][kept]):
            kept = "smaller"
            log(f"{nfe} NFE: the {smaller.solver.steps}-NFE result beats this budget's {label} and its fit on the "
                "validation noises; it is kept")
    scores["holdout"] = {k: score(held_for, s, held_z, held_target, batch) for k, s in solvers.items() if k != "smaller"}
    if "smaller" in solvers:
        scores["holdout"]["smaller"] = smaller.scores["holdout"][smaller.kept]
    solver = solvers[kept]
    method, share = chosen or (None, None)
    return Calibration(solver, label, kept, scores, {k: v[1] for k, v in candidates.items()}, sure, share, method,
                       {f: (s, c) for f, (_, s, c) in fits.items()})
