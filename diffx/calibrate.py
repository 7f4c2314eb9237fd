"""``diffx calibrate``: fit a sampler to one checkpoint (``diffx.samplers.learned``) and write it as a solver file.

    diffx calibrate ckpt=runs/<run>/model.safetensors steps=10 sampler=unipc
    diffx sample ckpt=runs/<run>/model.safetensors sampler=learned sampler.path=runs/<run>/solver_unipc_10.safetensors

The base sampler on its grid is traced into its linear form, the model's own high-accuracy ODE
endpoints are computed from ``samples + validation + holdout`` calibration noises (seeds from ``seed``,
by default far from ``diffx sample``'s), the coefficients and call times are fitted on the first
``samples``, the fit is kept only if it beats the base on the ``validation`` noises (else the base is),
and the RMS endpoint error of the base sampler and of the fitted one on the ``holdout`` noises, used
by neither, is printed and stored in the file. The fit is for this checkpoint, NFE and guidance scale (``cfg``, ``label`` /
``prompt``): sampling with another scale works but is not what it was tuned for.
"""

from __future__ import annotations

import time
from pathlib import Path

import re

import torch
from omegaconf import DictConfig
from rich.console import Console

from diffx import __version__, checkpoint, noise
from diffx.errors import DiffxError
from diffx.generate import check_guidance, denoiser, resolve_device, sampling_plan, start_noise
from diffx.samplers import learned


def calibrate(cfg: DictConfig) -> Path:
    """Fit ``cfg.sampler`` at ``cfg.steps`` on ``cfg.grid`` to ``cfg.ckpt``; returns the solver file."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx calibrate ckpt=runs/<run>/model.safetensors")
    device = resolve_device(cfg.device)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    parts.model.requires_grad_(False)  # only the solver's coefficients and times are fitted
    check_guidance(cfg.cfg, parts, cfg.ckpt)
    schedule, console = parts.objective.schedule, Console()
    plan = sampling_plan(cfg, schedule)
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", plan.name).strip("_")  # learned(unipc) -> learned_unipc
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / f"solver_{stem}_{plan.steps}.safetensors"
    if out.exists() and not cfg.overwrite:
        raise DiffxError(f"{out} already exists; choose another out= or pass overwrite=true")
    base = learned.trace(plan.sampler, schedule, plan.ts)

    total = cfg.samples + cfg.validation + cfg.holdout
    seeds = [cfg.seed + i for i in range(total)]
    inputs = parts.condition.inputs(cfg, seeds)
    z = start_noise(parts, noise.generators(seeds), device)

    def denoiser_for(idx: torch.Tensor):
        return denoiser(parts, [inputs[i] for i in idx.tolist()], None, cfg.cfg, device)

    t0 = time.time()
    target = torch.cat([learned.reference(denoiser_for(torch.arange(lo, min(lo + cfg.batch_size, total))), schedule,
                                          z[lo:lo + cfg.batch_size], cfg.reference_steps)
                        for lo in range(0, total, cfg.batch_size)])
    console.print(f"reference: {total} ODE solves at {cfg.reference_steps} steps in {time.time() - t0:.0f} s")
    val_end = cfg.samples + cfg.validation
    fit_z, fit_target = z[:cfg.samples], target[:cfg.samples]

    def split(lo: int, hi: int) -> tuple:
        rows = torch.arange(lo, hi)
        return (lambda idx: denoiser_for(rows[idx])), z[lo:hi], target[lo:hi]

    val, (held_for, held_z, held_target) = split(cfg.samples, val_end), split(val_end, total)
    before = learned.rms(held_for, base, held_z, held_target, cfg.batch_size)

    def report(i, loss):
        console.print(f"fit {i + 1}/{cfg.iters}  train RMS {loss ** 0.5:.3e}  ({time.time() - t0:.0f} s)")

    fitted = learned.fit(denoiser_for, base, fit_z, fit_target, iters=cfg.iters, lr=cfg.lr, t_lr=cfg.t_lr,
                         batch=cfg.batch_size, seed=cfg.seed, learn_times=cfg.learn_times, val=val, on_step=report)
    after = learned.rms(held_for, fitted, held_z, held_target, cfg.batch_size)
    fitted.meta = {"base": plan.name, "grid": plan.grid, "steps": plan.steps,
                   "nfe": fitted.steps, "cfg": cfg.cfg, "ckpt": str(cfg.ckpt), "ckpt_step": ckpt.step,
                   "samples": cfg.samples, "validation": cfg.validation, "holdout": cfg.holdout, "iters": cfg.iters, "seed": cfg.seed,
                   "reference_steps": cfg.reference_steps, "holdout_rms_base": before,
                   "holdout_rms_fitted": after, "diffx_version": __version__}
    learned.save(out, fitted)
    if fitted is base:
        console.print(f"note: the fit did not beat {plan.name} on the validation noises, so the file holds {plan.name} itself; "
                      "more samples= / iters= or a lower lr= may help")
    elif after >= before:
        console.print(f"warning: the fitted solver is not more accurate than {plan.name} on the held-out noises; "
                      f"fit with more samples= or iters=, or keep sampler={plan.name}")
    console.print(f"held-out RMS endpoint error ({cfg.holdout} noises, {fitted.steps} NFE): {plan.name} {before:.3e} -> "
                  f"fitted {after:.3e} ({after / before:.2f}x)\nwrote {out}\nuse: diffx sample ckpt={cfg.ckpt} "
                  f"sampler=learned sampler.path={out}")
    return out
