"""``diffx calibrate``: fit a sampler to one checkpoint (``diffx.samplers.calibration``) and write it as a solver file.

    diffx calibrate ckpt=runs/<run>/model.safetensors steps=10                # or steps=[5,10,20]
    diffx sample ckpt=runs/<run>/model.safetensors sampler=learned sampler.path=runs/<run>/solver_auto_10.safetensors

The model's own high-accuracy ODE endpoints are computed once from ``samples + validation + holdout``
calibration noises (seeds from ``seed``, by default far from ``diffx sample``'s). Then, per NFE of ``steps``:
with ``sampler=auto`` every deterministic sampler x grid is scored on the ``samples + validation`` noises (with a
named sampler, that sampler on ``grid``), the fit (``method=staged|joint|lbfgs``) starts from the best
(``calibration.best``: near the lowest RMS, the one that flips modes least), and the
fit (of the later ``1 - freeze`` of the calls; with lists, ``freeze=[0,0.5]`` or ``method=[joint,lbfgs]``, one
fit for each method and share, the best that passes) is
kept only if it beats that base on the validation noises, in
``confidence`` of bootstrap draws of them (else the base is; with several budgets, a smaller budget's result that
beats both is kept instead). The errors of both on the
``holdout`` noises, used by neither, are printed and stored in the file. The fit is for this checkpoint, NFE and
guidance scale (``cfg``, ``label`` / ``prompt``): sampling with another scale works but is not what it was tuned for.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from diffx import __version__, checkpoint, noise
from diffx.errors import DiffxError
from diffx.generate import check_guidance, denoiser, resolve_device, start_noise
from diffx.samplers import calibration, learned
from diffx.samplers.plan import name_of


def calibrate(cfg: DictConfig) -> list[Path]:
    """Fit a solver at each NFE of ``cfg.steps`` to ``cfg.ckpt``; returns the solver files."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx calibrate ckpt=runs/<run>/model.safetensors")
    budgets = _budgets(cfg.steps)
    method = calibration.methods(list(cfg.method) if OmegaConf.is_list(cfg.method) else cfg.method)
    weight = cfg.path_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise DiffxError(f"path_weight={weight}: expected a number >= 0 (0: endpoint loss only)")
    freeze = calibration.freezes(list(cfg.freeze) if OmegaConf.is_list(cfg.freeze) else cfg.freeze)
    _check_share(cfg, "confidence", "a share in [0, 1), e.g. 0.9 (0 keeps any fit that wins)")
    device = resolve_device(cfg.device)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    parts.model.requires_grad_(False)  # only the solver's coefficients and times are fitted
    check_guidance(cfg.cfg, parts, cfg.ckpt)
    schedule, console = parts.objective.schedule, Console()
    sampler, grid = instantiate(cfg.sampler), instantiate(cfg.grid)
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", name_of(sampler)).strip("_")  # learned(unipc) -> learned_unipc
    outs = {n: _out_path(cfg, stem, n, len(budgets)) for n in budgets}

    total = cfg.samples + cfg.validation + cfg.holdout
    seeds = [cfg.seed + i for i in range(total)]
    inputs = parts.condition.inputs(cfg, seeds)
    z = start_noise(parts, noise.generators(seeds), device)

    def denoiser_for(idx: torch.Tensor):
        return denoiser(parts, [inputs[i] for i in idx.tolist()], None, cfg.cfg, device)

    t0 = time.time()
    found = calibration.calibrate(
        None, schedule, steps=budgets, noise=z, denoiser_for=denoiser_for, samples=cfg.samples,
        validation=cfg.validation, holdout=cfg.holdout, reference_steps=cfg.reference_steps,
        choices=_choices(sampler, grid), method=method, iters=cfg.iters, lr=cfg.lr, t_lr=cfg.t_lr,
        batch=cfg.batch_size, learn_times=cfg.learn_times, seed=cfg.seed, path_weight=float(cfg.path_weight),
        freeze=freeze, confidence=float(cfg.confidence),
        log=lambda msg: console.print(escape(f"{msg}  ({time.time() - t0:.0f} s)")))
    for n, result in found.items():
        _write(cfg, ckpt, outs[n], result, console)
    return list(outs.values())


def _check_share(cfg: DictConfig, key: str, expected: str) -> None:
    """A one-line ``DiffxError`` unless ``cfg[key]`` is a number in [0, 1), checked before the costly solves."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise DiffxError(f"{key}={value}: expected {expected}")


def _budgets(steps) -> list[int]:
    """``steps=10`` or ``steps=[5,10,20]``: the NFE budgets, each a positive integer."""
    values = list(steps) if OmegaConf.is_list(steps) or isinstance(steps, (list, tuple)) else [steps]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise DiffxError(f"steps={steps}: expected a positive integer or a list of them, e.g. steps=[5,10,20]")
    return sorted(set(values))


def _choices(sampler, grid):
    """The bases to try: all (``sampler=auto``), or the named sampler on ``grid`` (a fitted solver on its own times)."""
    if hasattr(sampler, "resolve"):  # sampler=auto: every deterministic sampler x grid
        return None
    own = getattr(sampler, "ts", None)
    call_times = grid if own is None else (lambda steps, schedule: torch.cat([own, own.new_zeros(1)]))
    return [(f"{name_of(sampler)} on {name_of(grid) if own is None else 'its own times'}", sampler, call_times)]


def _out_path(cfg: DictConfig, stem: str, nfe: int, budgets: int) -> Path:
    """``out=`` (with ``{nfe}`` in it when several budgets), or ``<ckpt folder>/solver_<sampler>_<nfe>.safetensors``."""
    if cfg.out and budgets > 1 and "{nfe}" not in str(cfg.out):
        raise DiffxError(f"out={cfg.out}: with several steps= put {{nfe}} in the name, e.g. out=solver_{{nfe}}.safetensors")
    out = Path(str(cfg.out).replace("{nfe}", str(nfe))) if cfg.out else \
        Path(cfg.ckpt).parent / f"solver_{stem}_{nfe}.safetensors"
    if out.exists() and not cfg.overwrite:
        raise DiffxError(f"{out} already exists; choose another out= or pass overwrite=true")
    return out


def _write(cfg: DictConfig, ckpt, out: Path, result: calibration.Calibration, console: Console) -> None:
    solver, held = result.solver, result.scores["holdout"]
    before, after = held["base"], held[result.kept]
    solver.meta = {**solver.meta, "nfe": solver.steps, "cfg": cfg.cfg, "ckpt": str(cfg.ckpt), "ckpt_step": ckpt.step,
                   "samples": cfg.samples, "validation": cfg.validation, "holdout": cfg.holdout, "iters": cfg.iters,
                   "method": result.method, "path_weight": float(cfg.path_weight), "seed": cfg.seed,
                   "freeze": result.freeze, "fits_tried": [f"{m} freeze={f:g}" for m, f in result.fits],
                   "confidence": float(cfg.confidence),
                   "fit_confidence": result.confidence,
                   "reference_steps": cfg.reference_steps, "kept": result.kept,
                   "holdout_rms_base": before.rms, "holdout_rms_fitted": after.rms,
                   "holdout_mean_base": before.mean, "holdout_mean_fitted": after.mean, "diffx_version": __version__}
    learned.save(out, solver)
    if result.kept == "smaller":
        console.print(f"note: the solver fitted at a smaller budget ({solver.steps} NFE) beat this budget's fit and "
                      f"{result.base} on the validation noises, so the file holds it: {solver.steps} network calls")
    elif result.kept == "base":
        console.print(f"note: the fit did not beat {result.base} on the validation noises in {cfg.confidence:.0%} of "
                      f"bootstrap draws of them (it did in {result.confidence:.0%}), so the file holds {result.base} "
                      "itself; more samples= / validation= / iters=, or method=lbfgs, may help")
    elif not after.beats(before):
        console.print(f"warning: the fitted solver is not more accurate than {result.base} on the held-out noises "
                      "on both metrics; fit with more samples= or iters=")
    console.print(f"held-out RMS endpoint error ({cfg.holdout} noises, {solver.steps} NFE): {result.base} "
                  f"{before.rms:.3e} -> {result.kept} {after.rms:.3e} ({after.rms / before.rms:.2f}x); per-sample mean "
                  f"{before.mean:.3e} -> {after.mean:.3e}, median {before.median:.3e} -> {after.median:.3e}\n"
                  f"wrote {out}\nuse: diffx sample ckpt={cfg.ckpt} sampler=learned sampler.path={out}")
