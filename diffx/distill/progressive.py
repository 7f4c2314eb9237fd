"""Progressive distillation (Salimans & Ho 2022, Alg. 2): one student DDIM step = two teacher DDIM steps.

On a grid of N student steps ``t_0 = 1 > ... > t_N = 0`` whose teacher grid has the midpoints, the
student at ``x_t`` is trained toward the ``x0~`` that makes its one DDIM step ``t -> t''`` land where the
teacher's two steps ``t -> t' -> t''`` land. A DDIM step is ``x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0)
/ sigma_t``, so (Alg. 2, line 11)

    x0~ = (x_t'' - (sigma_t'' / sigma_t) x_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).

The loss compares the student's ``x0_hat`` with ``x0~`` weighted by ``max(SNR, 1)`` ("truncated SNR",
sec. 4), or its v with ``v~`` (``space=v``). Everything goes through the denoiser contract, so it is
the same for every objective and schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from diffx.samplers.denoiser import Denoise
from diffx.tensors import bcast


def ddim_to(schedule, x0: Tensor, noise: Tensor, t_next: Tensor) -> Tensor:
    """One deterministic DDIM step to ``t_next`` (B,) from a denoiser's ``(x0_hat, noise_hat)``."""
    a, s = (bcast(v, x0).to(x0.dtype) for v in schedule.alpha_sigma(t_next))
    return a * x0 + s * noise


def two_step_target(teacher: Denoise, schedule, xt: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor) -> Tensor:
    """``x0~`` (like xt) such that one DDIM step ``t -> t_next`` from ``xt`` equals the teacher's two DDIM
    steps ``t -> t_mid -> t_next``; times (B,), ``t > t_mid > t_next``."""
    x_mid = ddim_to(schedule, *teacher(xt, t), t_mid)              # Alg. 2, line 8
    x_next = ddim_to(schedule, *teacher(x_mid, t_mid), t_next)     # line 10
    a_t, s_t = (bcast(v, xt).to(xt.dtype) for v in schedule.alpha_sigma(t))
    a_n, s_n = (bcast(v, xt).to(xt.dtype) for v in schedule.alpha_sigma(t_next))
    ratio = s_n / s_t
    return (x_next - ratio * xt) / (a_n - ratio * a_t)             # line 11


def _x0_space(x0_hat, x0_target, xt, a, s) -> Tensor:
    snr = (a / s) ** 2
    return snr.clamp(min=1.0).flatten(1)[:, 0] * ((x0_hat - x0_target) ** 2).flatten(1).mean(1)


def _v_space(x0_hat, x0_target, xt, a, s) -> Tensor:
    def v(x0):  # Salimans & Ho's v = alpha eps - sigma x0, with eps the one x0 implies at xt
        return a * (xt - a * x0) / s - s * x0
    return ((v(x0_hat) - v(x0_target)) ** 2).flatten(1).mean(1)


SPACES: dict[str, Callable] = {"x0": _x0_space, "v": _v_space}


def student_loss(objective, pred: Tensor, xt: Tensor, t: Tensor, x0_target: Tensor, space: str = "x0") -> Tensor:
    """Per-sample loss (B,) of the student's output ``pred`` at ``(xt, t)`` against ``x0~``."""
    x0_hat, _ = objective.to_x0_noise(pred.float(), xt.float(), t)
    a, s = (bcast(v, xt).float() for v in objective.schedule.alpha_sigma(t))
    return SPACES[space](x0_hat, x0_target.float(), xt.float(), a, s)


def grids(ts: Tensor, rounds: int) -> list[Tensor]:
    """The teacher grid ``ts`` and each round's student grid, every other time of the one before."""
    out = [ts]
    for _ in range(rounds):
        if (len(out[-1]) - 1) % 2:
            raise ValueError(f"{len(out[-1]) - 1} steps cannot be halved")
        out.append(out[-1][::2])
    return out


def draw_times(student_ts: Tensor, teacher_ts: Tensor, n: int, generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, t_mid, t_next)`` (n,) each: a student step drawn uniformly (Alg. 2 draws t on the grid)."""
    i = torch.randint(0, len(student_ts) - 1, (n,), generator=generator)
    return student_ts[i].float(), teacher_ts[2 * i + 1].float(), student_ts[i + 1].float()


def grid_times(ts: Tensor, n: int, generator) -> Tensor:
    """(n,) call times drawn uniformly from the grid ``ts`` (its last time, 0, is never a call)."""
    return ts[torch.randint(0, len(ts) - 1, (n,), generator=generator)].float()


def noised(schedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = alpha x0 + sigma noise`` (B, C, H, W)."""
    a, s = (bcast(v, x0).to(x0.dtype) for v in schedule.alpha_sigma(t))
    return a * x0 + s * noise


def run(ctx) -> Path:
    """``diffx distill method=progressive``: ``rounds`` halvings of the teacher's ``teacher_steps`` DDIM steps.
    The condition is dropped at ``train.cond_drop`` as in training, so the student keeps CFG."""
    from diffx import conditioning

    cfg, condition, device = ctx.cfg, ctx.teacher.condition, ctx.device
    null = condition.null(cfg.train.batch_size, device)

    def cond_of(batch, gen):
        keep = torch.rand(len(batch["x"]), generator=gen) >= cfg.train.cond_drop
        return conditioning.drop(condition(batch, device), cfg.train.cond_drop, null, keep=keep.to(device))

    return halvings(ctx, ctx.teacher.model, ladder(ctx), cond_of, "progressive")


def halvings(ctx, teacher, steps_ladder: list[Tensor], cond_of, method: str, guidance: bool = False) -> Path:
    """Rounds 1..R: round r's student (initialised from its teacher, the round before's EMA student)
    learns two teacher DDIM steps of ``steps_ladder[r - 1]`` per step of ``steps_ladder[r]``.
    ``cond_of(batch, generator)``: a batch's condition, as the method draws it."""
    from diffx.distill.loop import Round, fit
    from diffx.samplers.denoiser import make_denoiser

    cfg, objective, device, x0_range = ctx.cfg, ctx.teacher.objective, ctx.device, ctx.teacher.latent.x0_range
    schedule, dataset = objective.schedule, ctx.data()
    for r in range(1, len(steps_ladder)):
        teacher_ts, student_ts = steps_ladder[r - 1], steps_ladder[r]

        def loss(student, batch, gen, teacher=teacher, teacher_ts=teacher_ts, student_ts=student_ts):
            x0, cond = batch["x"].to(device), cond_of(batch, gen)
            t, t_mid, t_next = (v.to(device) for v in draw_times(student_ts, teacher_ts, x0.shape[0], gen))
            xt = noised(schedule, x0, torch.randn(x0.shape, generator=gen).to(device), t)
            with torch.no_grad():
                target = two_step_target(make_denoiser(teacher, objective, cond, x0_range=x0_range),
                                         schedule, xt, t, t_mid, t_next)
            return student_loss(objective, student(xt, t, cond), xt, t, target, cfg.space)

        student, parts = ctx.student(teacher, guidance=guidance)
        sampling = {"steps": len(student_ts) - 1, "ts": student_ts.tolist(), "method": method}
        later = tuple(f"round{k}" for k in range(r + 1, len(steps_ladder)))
        teacher = fit(ctx.run_dir, Round(f"round{r}", student, loss, dataset, parts, ctx.ckpt.spec, sampling, 2, later),
                      cfg.train, cfg.seed + r, ctx.accelerator, ctx.console)
    return ctx.run_dir / f"round{len(steps_ladder) - 1}" / "model.safetensors"


def ladder(ctx) -> list[Tensor]:
    """The teacher's ``teacher_steps`` uniform grid and each round's halving of it."""
    from diffx import grids as time_grids
    from diffx.errors import DiffxError

    steps, rounds = ctx.cfg.teacher_steps, ctx.cfg.rounds
    if rounds < 1 or steps < 2 ** rounds or steps % 2 ** rounds:
        raise DiffxError(f"teacher_steps={steps} cannot be halved rounds={rounds} times; "
                         f"use a multiple of {2 ** max(rounds, 0)}, e.g. teacher_steps={2 ** max(rounds, 0) * 2}")
    return grids(time_grids.uniform(steps, ctx.teacher.objective.schedule), rounds)
