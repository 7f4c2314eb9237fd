"""``diffx calibrate``: fit a sampler to one checkpoint (``diffx.learned``) and write it as a solver file.

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

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from diffx import __version__, checkpoint, learned, noise
from diffx.errors import DiffxError
from diffx.sample import check_guidance, condition_inputs, resolve_device
from diffx.samplers import make_denoiser


def calibrate(cfg: DictConfig) -> Path:
    """Fit ``cfg.sampler`` at ``cfg.steps`` on ``cfg.grid`` to ``cfg.ckpt``; returns the solver file."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx calibrate ckpt=runs/<run>/model.safetensors")
    name = cfg.sampler._target_.rsplit(".", 1)[-1]
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / f"solver_{name}_{cfg.steps}.safetensors"
    if out.exists() and not cfg.overwrite:
        raise DiffxError(f"{out} already exists; choose another out= or pass overwrite=true")
    device = resolve_device(cfg.device)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    parts.model.requires_grad_(False)  # only the solver's coefficients and times are fitted
    check_guidance(cfg, parts)
    schedule, console = parts.objective.schedule, Console()
    base = learned.trace(instantiate(cfg.sampler), schedule, instantiate(cfg.grid)(cfg.steps, schedule))

    total = cfg.samples + cfg.validation + cfg.holdout
    seeds = [cfg.seed + i for i in range(total)]
    inputs = condition_inputs(cfg, parts.condition, ckpt.spec, seeds)
    c, size = parts.latent.channels(ckpt.spec.channels), ckpt.spec.image_size // parts.latent.factor
    z = noise.randn((total, c, size, size), noise.generators(seeds), device)

    def denoiser_for(idx: torch.Tensor):
        chunk = [inputs[i] for i in idx.tolist()]
        return make_denoiser(parts.model, parts.objective, parts.condition.encode(chunk, device),
                             parts.condition.null(len(chunk), device), cfg_scale=cfg.cfg,
                             x0_range=parts.latent.x0_range)

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
    fitted.meta = {"base": name, "grid": cfg.grid._target_.rsplit(".", 1)[-1], "steps": cfg.steps,
                   "nfe": fitted.steps, "cfg": cfg.cfg, "ckpt": str(cfg.ckpt), "ckpt_step": ckpt.step,
                   "samples": cfg.samples, "validation": cfg.validation, "holdout": cfg.holdout, "iters": cfg.iters, "seed": cfg.seed,
                   "reference_steps": cfg.reference_steps, "holdout_rms_base": before,
                   "holdout_rms_fitted": after, "diffx_version": __version__}
    learned.save(out, fitted)
    if fitted is base:
        console.print(f"note: the fit did not beat {name} on the validation noises, so the file holds {name} itself; "
                      "more samples= / iters= or a lower lr= may help")
    elif after >= before:
        console.print(f"warning: the fitted solver is not more accurate than {name} on the held-out noises; "
                      f"fit with more samples= or iters=, or keep sampler={name}")
    console.print(f"held-out RMS endpoint error ({cfg.holdout} noises, {fitted.steps} NFE): {name} {before:.3e} -> "
                  f"fitted {after:.3e} ({after / before:.2f}x)\nwrote {out}\nuse: diffx sample ckpt={cfg.ckpt} "
                  f"sampler=learned sampler.path={out}")
    return out
