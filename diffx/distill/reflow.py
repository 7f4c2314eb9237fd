"""Reflow (Liu et al. 2023, "Flow straight and fast", sec. 2.3; InstaFlow, Liu et al. 2024).

Draw noises ``z``, solve the teacher's probability-flow ODE from each to its endpoint ``x0 = ODE(z)``
(a coupling, not independent pairs), and train a student, initialised from the teacher, on the straight
paths between them: ``x_t = (1 - t) x0 + t z`` with the velocity target ``z - x0`` for ``t ~ U[0, 1]``
(the flow objective's own loss, given that noise). The new flow's paths are straighter, so one or two
Euler steps follow them. A second reflow draws its pairs from the first student.

Each pair has its condition: a class label drawn uniformly, or for a text teacher a caption drawn from its
training captions (one per training image, so with their frequencies, and none of ``data.holdout``'s
combinations: held-out prompts stay unseen), stored with the pair. The pairs are made in shards written
atomically under ``<run>/pairs[-k]/`` (captions in the shard's metadata); pair ``i`` is a function of
``seed + i`` alone (its noise, its label or caption), so a resumed run makes only the missing shards, the
same ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from hydra.utils import instantiate
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffx import conditioning, grids
from diffx.atomic import atomic_write
from diffx.errors import DiffxError
from diffx.generate import denoiser, draw, start_noise
from diffx.noise import generators
from diffx.samplers import plan as plans


def pair_inputs(parts, seeds: list[int], captions: list[str] = ()) -> list:
    """Each pair's condition input, from its seed alone: a class label drawn uniformly, a caption drawn from
    ``captions`` (a text teacher's training captions), or None (unconditional)."""
    tells = parts.condition.tells
    if tells is None:
        return [None] * len(seeds)
    choices = captions if tells == "caption" else range(parts.spec.num_classes)
    if not choices:
        raise DiffxError(f"reflow pairs of a {tells}-conditioned teacher need {tells}s to draw from; none were given")
    return [choices[random.Random(s).randrange(len(choices))] for s in seeds]


def endpoints(parts, plan: plans.Plan, seeds: list[int], scale: float, device,
              captions: list[str] = ()) -> dict:
    """``{"z", "x0"[, "label" | "caption"]}`` for ``seeds``: each seed's start noise, its condition, and the
    plan's ODE endpoint from it (``diffx.generate``'s noise, denoiser and guidance, as ``diffx sample``
    draws it for that label or prompt)."""
    inputs = pair_inputs(parts, seeds, captions)
    z = start_noise(parts, generators(seeds), device)  # (n, C, H, W)
    with torch.no_grad():
        x0 = draw(plan, parts.objective.schedule, denoiser(parts, inputs, None, scale, device), z)
    out = {"z": z.float().cpu(), "x0": x0.float().cpu()}
    tells = parts.condition.tells
    return out | ({"label": torch.tensor(inputs, dtype=torch.long)} if tells == "class" else
                  {"caption": inputs} if tells == "caption" else {})


def cache_pairs(folder: Path, parts, plan: plans.Plan, n: int, shard: int, scale: float, seed: int, device,
                batch_size: int, console, captions: list[str] = ()) -> dict:
    """``n`` pairs in shards of ``shard`` under ``folder``, making only the shards not there yet; all of them:
    ``{"z", "x0"}`` (n, C, H, W) and ``"label"`` (n,) or ``"caption"`` (n strings)."""
    passes = plan.steps * (2 if scale != 1 else 1) * _per_step(plan)
    console.print(f"reflow pairs: {n} from {plan.name} {plan.steps} steps at cfg={scale:g} in {folder}; teacher "
                  f"cost {passes} passes per pair = {n * passes:,} teacher NFE")
    rows = []
    for k, lo in enumerate(range(0, n, shard)):
        path = folder / f"shard-{k:05d}.safetensors"
        if not path.is_file():
            seeds = list(range(seed + lo, seed + min(lo + shard, n)))
            chunks = [endpoints(parts, plan, seeds[i: i + batch_size], scale, device, captions)
                      for i in range(0, len(seeds), batch_size)]
            _write(path, {key: _cat([c[key] for c in chunks]) for key in chunks[0]})
            console.print(f"reflow pairs: {min(lo + shard, n)}/{n}")
        rows.append(_read(path))
    return {key: _cat([r[key] for r in rows]) for key in rows[0]}


def _cat(parts: list) -> Tensor | list:
    return torch.cat(parts).contiguous() if isinstance(parts[0], Tensor) else [v for p in parts for v in p]


def _write(path: Path, pairs: dict) -> None:
    """One shard, atomically: the tensors, and the captions (strings) as JSON in the file's metadata."""
    tensors = {k: v for k, v in pairs.items() if isinstance(v, Tensor)}
    text = {k: json.dumps(v) for k, v in pairs.items() if not isinstance(v, Tensor)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=text or None))


def _read(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        text = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k == "caption"}
    return load_file(str(path)) | text


def _per_step(plan) -> int:
    return 2 if plan.name == "heun" else 1


class Pairs(torch.utils.data.Dataset):
    """The cached pairs as items ``{"z", "x0"[, "label" | "caption"]}``."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["z"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}


def straight_loss(objective, student, z: Tensor, x0: Tensor, t: Tensor, cond) -> Tensor:
    """Per-sample loss (B,) on the straight path from ``x0`` to ``z``: the flow objective with ``noise = z``."""
    return objective.loss(student, x0, cond, t=t, noise=z)


def run(ctx) -> Path:
    """``diffx distill method=reflow``: ``rounds`` reflows (1 or 2), each from pairs of the model before."""
    from diffx.distill.loop import Round, fit

    cfg, rc, objective, condition = ctx.cfg, ctx.cfg.reflow, ctx.teacher.objective, ctx.teacher.condition
    if objective.family != "flow":
        raise DiffxError(f"method=reflow straightens a flow model's paths; ckpt={cfg.ckpt} is objective="
                         f"{objective.family} (use method=progressive)")
    if float(rc.cfg) != 1 and not condition.guidable:
        raise DiffxError(f"reflow.cfg={rc.cfg} needs a conditional teacher; use reflow.cfg=1")
    device, schedule = ctx.device, objective.schedule
    plan = plans.make(instantiate(cfg.sampler), instantiate(cfg.grid), rc.teacher_steps, schedule)
    student_ts = grids.uniform(rc.steps, schedule)
    null = condition.null(cfg.train.batch_size, device)
    source, scale = ctx.teacher, float(rc.cfg)
    captions = ctx.captions() if condition.tells == "caption" else ()
    for r in range(1, cfg.rounds + 1):
        folder = ctx.run_dir / ("pairs" if r == 1 else f"pairs-{r}")
        pairs = Pairs(cache_pairs(folder, source, plan, rc.pairs, rc.shard, scale, cfg.seed + 10_000_000 * r,
                                  device, cfg.batch_size, ctx.console, captions))

        def loss(student, batch, gen):
            z, x0 = batch["z"].to(device), batch["x0"].to(device)
            keep = torch.rand(z.shape[0], generator=gen) >= cfg.train.cond_drop
            cond = conditioning.drop(condition(batch, device) if condition.guidable else None, cfg.train.cond_drop,
                                     null, keep=keep.to(device))
            t = torch.rand(z.shape[0], generator=gen).to(device)  # uniform t, as Liu et al. train
            return straight_loss(objective, student, z, x0, t, cond)

        student, parts = ctx.student(source.model)
        sampling = {"steps": rc.steps, "ts": student_ts.tolist(), "method": f"reflow-{r}"}
        later = tuple(name for k in range(r + 1, cfg.rounds + 1) for name in (f"pairs-{k}", f"reflow{k}"))
        model = fit(ctx.run_dir, Round(f"reflow{r}", student, loss, pairs, parts, ctx.ckpt.spec, sampling, 0, later),
                    cfg.train, cfg.seed + r, ctx.accelerator, ctx.console)
        # the next reflow's pairs come from this student's own ODE, unguided: its pairs were guided already
        source, scale = _with_model(ctx.teacher, model), 1.0
    return ctx.run_dir / f"reflow{cfg.rounds}" / "model.safetensors"


def _with_model(parts, model):
    from dataclasses import replace

    return replace(parts, model=model)
