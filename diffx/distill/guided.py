"""Guided distillation (Meng et al. 2023, "On distillation of guided diffusion models").

Stage 1 (sec. 4.1): a student that takes the guidance scale ``w`` as an input (an embedding added to
the timestep's, zero-initialised: ``diffx.models.layers.GuidanceEmbedder``) is trained to match the
classifier-free-guided teacher, ``x0_hat_w = x0_u + w (x0_c - x0_u)``, for ``w ~ U[w_min, w_max]`` drawn
per sample (a (B,) scale through ``make_denoiser``).
Stage 2 (sec. 4.2): progressive rounds (``diffx.distill.progressive``) on that student, the teacher of
each round also taking ``w`` as an input. Sampling then costs one forward pass per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffx.errors import DiffxError
from diffx.samplers.denoiser import make_denoiser


def guided_target(teacher, objective, cond: dict, uncond: dict, w: float | Tensor, xt: Tensor, t: Tensor,
                  x0_range=None) -> Tensor:
    """The guided teacher's ``x0_hat`` at scale ``w`` (a float, or (B,) one per sample), by the one CFG of
    ``make_denoiser``: stage 1's target ``x0_u + w_i (x0_c - x0_u)``."""
    x0, _ = make_denoiser(teacher, objective, cond, uncond, cfg_scale=w, x0_range=x0_range)(xt, t)
    return x0


def with_w(cond: dict, w: Tensor) -> dict:
    """``cond`` with the per-sample scales as an input, ``cond["w"]`` (B,)."""
    first = next(iter(cond.values()))
    return {**cond, "w": w.to(device=first.device, dtype=torch.float32)}


def draw_w(w_range, n: int, generator) -> Tensor:
    """One scale per sample, ``w ~ U[w_min, w_max]`` (n,) (Meng et al. 2023, sec. 4.1)."""
    lo, hi = (float(v) for v in w_range)
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def run(ctx) -> Path:
    """``diffx distill method=guided``: stage 1 on the teacher's ``teacher_steps`` grid, then ``rounds``
    progressive halvings, every model taking ``w`` as an input (no condition dropout: no uncond pass)."""
    from diffx.distill.loop import Round, fit
    from diffx.distill.progressive import grid_times, halvings, ladder, noised, student_loss

    cfg, objective, condition = ctx.cfg, ctx.teacher.objective, ctx.teacher.condition
    if not condition.guidable:
        raise DiffxError(f"method=guided needs a conditional teacher; ckpt={cfg.ckpt} is unconditional "
                         "(use method=progressive)")
    schedule, device, x0_range = objective.schedule, ctx.device, ctx.teacher.latent.x0_range
    steps_ladder, teacher = ladder(ctx), ctx.teacher.model
    null = condition.null(cfg.train.batch_size, device)

    def stage1(student, batch, gen):
        x0 = batch["x"].to(device)
        cond, w = condition(batch, device), draw_w(cfg.w_range, x0.shape[0], gen).to(device)
        t = grid_times(steps_ladder[0], x0.shape[0], gen).to(device)  # where round 1 calls its teacher
        xt = noised(schedule, x0, torch.randn(x0.shape, generator=gen).to(device), t)
        with torch.no_grad():
            target = guided_target(teacher, objective, cond, null, w, xt, t, x0_range)
        return student_loss(objective, student(xt, t, with_w(cond, w)), xt, t, target, cfg.space)

    student, parts = ctx.student(teacher, guidance=True)
    sampling = {"steps": len(steps_ladder[0]) - 1, "ts": steps_ladder[0].tolist(), "method": "guided"}
    later = tuple(f"round{k}" for k in range(1, len(steps_ladder)))
    student = fit(ctx.run_dir, Round("round0", student, stage1, ctx.data(), parts, ctx.ckpt.spec, sampling, 2, later),
                  cfg.train, cfg.seed, ctx.accelerator, ctx.console)
    return halvings(ctx, student, steps_ladder, lambda batch, gen: with_w(
        condition(batch, device), draw_w(cfg.w_range, len(batch["x"]), gen)), "guided", guidance=True)
