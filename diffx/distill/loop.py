"""The student training loop every distillation method shares: one round = one student trained with a
loss the method supplies, with an EMA, a progress bar, a log, exact resume and atomic checkpoints,
all from ``diffx.train``'s pieces (``diffx.ema``, ``diffx.resume``, ``diffx.progress``, ``diffx.checkpoint``).

A round lives in its own folder (``<run>/round1``, ...): ``model.safetensors`` (the EMA student, with its
native steps and grid), ``state/`` (the resume state) and ``log.jsonl``; ``done.json`` marks it finished,
so a resumed run skips it and reads its student back, or, when ``train.steps`` is raised above the steps
it trained, continues it from its last state (unless a later round was already trained from it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diffx import checkpoint
from diffx.atomic import atomic_write
from diffx.build import DataSpec
from diffx.ema import EMA
from diffx.errors import DiffxError
from diffx.lr_schedules import Constant
from diffx.preemption import Preempted, Preemption
from diffx.progress import TrainProgress, log_line
from diffx.resume import EpochSampler, batches, load_state, save_state, state_exists

DONE = "done.json"

# (student, batch of the dataset, the round's draws generator) -> per-sample loss (B,)
Loss = Callable[[nn.Module, dict, torch.Generator], Tensor]


@dataclass
class Round:
    """What one round trains: a student (initialised by the method), its loss, the data it draws from,
    what its checkpoint records, and the teacher forward passes per image per step (for the cost line)."""

    name: str
    student: nn.Module
    loss: Loss
    dataset: torch.utils.data.Dataset
    parts: dict                 # the student's resolved parts config (checkpoint metadata)
    spec: DataSpec
    sampling: dict              # native {"steps", "ts", "method"}
    teacher_passes: int         # teacher network passes per image per training step
    later: tuple[str, ...] = ()  # the folders of the rounds (and pairs) made from this round's student


def fit(run_dir: Path, rnd: Round, tc, seed: int, accelerator, console) -> nn.Module:
    """Train ``rnd.student`` for ``tc.steps`` steps (or resume it, or read it back if done, or extend it
    if done in fewer steps); returns the EMA student in eval mode, the next round's teacher."""
    folder = run_dir / rnd.name
    done = json.loads((folder / DONE).read_text())["step"] if (folder / DONE).is_file() else None
    if done is not None and done >= tc.steps:
        rnd.student.load_state_dict(load_file(str(folder / "model.safetensors")))
        console.print(f"{rnd.name}: done earlier (step {done}), read back {folder / 'model.safetensors'}")
        return rnd.student.eval().requires_grad_(False)
    if done is not None:
        _check_extendable(run_dir, rnd, done, tc.steps)
        console.print(f"{rnd.name}: done earlier at step {done}; train.steps={tc.steps} extends it from its state")
        (folder / DONE).unlink()  # from here it is a stopped round: its state and checkpoint are step `done`'s
    device = accelerator.device
    model = rnd.student.to(device).train().requires_grad_(True)
    ema = EMA(model, tc.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Constant(warmup=tc.warmup, total=tc.steps))
    draws = torch.Generator().manual_seed(seed)
    sampler = EpochSampler(len(rnd.dataset), seed=seed)
    loader = torch.utils.data.DataLoader(rnd.dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise DiffxError(f"train.batch_size={tc.batch_size} is larger than the {rnd.name} data ({len(rnd.dataset)})")
    step = load_state(folder, accelerator, model, ema, optimizer, scheduler, tc, (draws,)) if state_exists(folder) else 0
    folder.mkdir(parents=True, exist_ok=True)
    stream = batches(loader, sampler, start=step)
    console.print(f"{rnd.name}: {rnd.sampling['steps']}-step student, {tc.steps} steps of batch {tc.batch_size}"
                  + (f", resuming at step {step}" if step else "") + f"; teacher cost {rnd.teacher_passes} passes "
                  f"per image per step = {rnd.teacher_passes * tc.batch_size * (tc.steps - step):,} teacher NFE to go")
    total, window, started = 0.0, 0, time.perf_counter()
    with Preemption() as preemption, TrainProgress(tc.steps, start=step) as progress:
        while step < tc.steps:
            loss = rnd.loss(model, next(stream), draws).mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
            step += 1
            total, window = total + loss.item(), window + 1
            progress.advance(step)
            if step % tc.log_every == 0 or step == tc.steps:
                mean = total / window
                if not math.isfinite(mean):
                    raise DiffxError(f"{rnd.name}: the loss became {mean} by step {step}; lower train.lr")
                progress.update(step, mean)
                log_line(folder / "log.jsonl", step, {"loss": mean, "grad_norm": float(grad_norm),
                                                       "it_s": window / (time.perf_counter() - started)})
                total, window, started = 0.0, 0, time.perf_counter()
            save, stop = preemption.save_point(step, tc, accelerator)
            if save:
                checkpoint.save(folder / "model.safetensors", ema.state_dict(), rnd.parts, rnd.spec, step, rnd.sampling)
                save_state(folder, accelerator, model, ema, optimizer, scheduler, step, tc, (draws,))
            if stop:  # a distill run continues from its run dir (its states are per round): say so
                stopped = preemption.stopped("distill", run_dir, step)
                raise Preempted(stopped.code, stopped.message.replace(
                    f"resume={run_dir}", f"<the same overrides> run_dir={run_dir}"))
    atomic_write(folder / DONE, lambda tmp: Path(tmp).write_text(json.dumps({"step": step, **rnd.sampling})))
    console.print(f"{rnd.name}: saved {folder / 'model.safetensors'} ({rnd.sampling['steps']} steps)")
    return ema.model.eval().requires_grad_(False)


def _check_extendable(run_dir: Path, rnd: Round, done: int, steps: int) -> None:
    """A finished round can train on only if its state is there and no later round learnt from it."""
    made = [name for name in rnd.later if (run_dir / name).exists()]
    if made:
        raise DiffxError(f"{rnd.name} finished at step {done} and {run_dir / made[0]} was made from it; train.steps="
                         f"{steps} cannot extend {rnd.name} under it: distill into a new run_dir")
    if not state_exists(run_dir / rnd.name):
        raise DiffxError(f"{rnd.name} finished at step {done} with no resume state to extend it from "
                         f"(train.steps={steps}); distill into a new run_dir")


@dataclass
class Context:
    """What every method's ``run`` reads: the config, the teacher's parts and checkpoint, where to write."""

    cfg: object                 # conf/distill.yaml, resolved
    teacher: object             # diffx.build.Parts, weights loaded, eval mode
    ckpt: object                # diffx.checkpoint.Checkpoint of the teacher
    run_dir: Path
    accelerator: object
    console: object

    @property
    def device(self):
        return self.accelerator.device

    def data(self):
        """The teacher's training data (its stored ``data`` config), in the model's space: a dataset of
        ``{"x": x0, "label" | "caption": ...}``; the condition source prepared for its captions."""
        from diffx.latent import encode_once

        dataset, latent = self._dataset(), self.teacher.latent
        return encode_once(latent, dataset, self.device) if latent.cache else _Encoding(dataset, latent)

    def captions(self) -> list[str]:
        """The teacher's training captions, one per image (its data config rebuilt, so ``data.holdout``'s
        combinations are not among them); the condition source prepared for them."""
        return list(self._dataset().captions)

    def _dataset(self):
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        if "data" not in self.ckpt.parts:
            raise DiffxError(f"ckpt={self.cfg.ckpt} records no data config; this method trains on the teacher's data")
        dataset = instantiate(OmegaConf.create(self.ckpt.parts["data"])).dataset
        self.teacher.condition.prepare(dataset.captions, self.device)
        return dataset

    def student(self, init: nn.Module, guidance: bool = False) -> tuple[nn.Module, dict]:
        """A student initialised from ``init``'s weights, and its parts config. ``guidance``: it takes the
        scale as an input (``model.guidance_embed``), its new embedding zero-initialised, so it starts
        equal to ``init``."""
        import copy

        from diffx.build import build

        parts = copy.deepcopy(self.ckpt.parts)
        parts["model"]["guidance_embed"] = bool(guidance or parts["model"].get("guidance_embed", False))
        model = build(parts, self.ckpt.spec, latent=self.teacher.latent).model
        missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
        new = [k for k in missing if ".cond_embed.w." not in f".{k}"]
        if new or unexpected:
            raise DiffxError(f"the student does not fit its teacher's weights ({(new + unexpected)[:2]})")
        return model.to(self.device), parts


class _Encoding(torch.utils.data.Dataset):
    """Pixel-space items as they are (``latent=none``) or encoded per item: ``{"x": x0, ...}``."""

    def __init__(self, dataset, latent):
        self.dataset, self.latent = dataset, latent

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        with torch.no_grad():
            item["x"] = self.latent.encode(item["x"][None])[0]
        return item
