"""``diffx train``: build the parts from the config, then the training loop, through Accelerate.

Reads top to bottom: data -> parts -> optimizer -> prepare -> loop (loss, backward, clip, step,
EMA) -> log -> atomic checkpoints and a resume state.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffx import checkpoint, conditioning, resume
from diffx.build import DataSpec, build, parts_config
from diffx.ema import EMA
from diffx.errors import DiffxError
from diffx.latent import encode_once
from diffx.progress import TrainProgress
from diffx.resume import EpochSampler, save_state


def train(cfg: DictConfig) -> Path:
    """Train the configured model; returns the run directory holding ``model.safetensors``."""
    tc = cfg.train
    run_dir = Path(cfg.run_dir)
    # The loop steps the LR schedule once per optimizer step; Accelerate's default would step it once
    # per process, running the schedule N times too fast on N processes.
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu, step_scheduler_with_optimizer=False)
    set_seed(cfg.seed, device_specific=True)

    # 1. data and the shapes it decides, then the parts built for them
    data = instantiate(cfg.data)
    spec = DataSpec.of(data)
    if len(data.dataset) < tc.batch_size:
        raise DiffxError(f"train.batch_size={tc.batch_size} is larger than the dataset ({len(data.dataset)} images)")
    parts = build(cfg, spec)
    model, objective, latent, condition = parts.model, parts.objective, parts.latent, parts.condition
    latent.to(accelerator.device)

    # 2. the loader; the latent space says whether its encodings can be cached: then the data is
    # encoded once here, else every batch in the loop
    dataset = encode_once(latent, data.dataset, accelerator.device) if latent.cache else data.dataset
    to_x0 = _identity if latent.cache else latent.encode
    sampler = EpochSampler(len(dataset), seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=tc.num_workers,
                                         # its own generator: starting an epoch must not draw from the
                                         # global RNG, or a resumed run would diverge from a straight one
                                         generator=torch.Generator().manual_seed(cfg.seed))

    # 3. optimizer and learning-rate schedule
    ema = EMA(model, tc.ema_decay)
    optimizer = instantiate(cfg.optimizer, params=model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, instantiate(cfg.lr_schedule, warmup=tc.warmup, total=tc.steps))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema.model.to(accelerator.device)

    step = resume.start(run_dir, cfg, accelerator, model, ema, optimizer, scheduler)

    parts_cfg = parts_config(cfg)
    parts_cfg["latent"].update(latent.record())  # e.g. the VAE's sha256: sampling refuses another VAE
    log_path = run_dir / "log.jsonl"
    batches = resume.batches(loader, sampler, start=step)
    sums = torch.zeros(2, device=accelerator.device)  # [loss, grad norm] summed over the log window
    window_start, window_steps = time.perf_counter(), 0

    # Every batch has the same size (drop_last), so the null condition is encoded once, not per step.
    condition.prepare(data.dataset.captions, accelerator.device)
    null = condition.null(tc.batch_size, accelerator.device)
    accelerator.print(_summary(accelerator.unwrap_model(model), parts, len(data.dataset), tc, step, accelerator))

    # 4. the loop
    model.train()
    with TrainProgress(tc.steps, start=step, enabled=accelerator.is_main_process) as progress:
        while step < tc.steps:
            batch = next(batches)
            x0 = to_x0(batch["x"])
            # Labels or captions -> cond; the null one (label -1, empty prompt) replaces it at rate cond_drop.
            cond = conditioning.drop(condition(batch, accelerator.device), tc.cond_drop, null)
            loss = objective.loss(model, x0, cond).mean()
            accelerator.backward(loss)
            # The norm is computed either way (max_norm=inf clips nothing): it is logged and NaN-checked.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(accelerator.unwrap_model(model))
            sums += torch.stack([loss.detach().float(), torch.as_tensor(grad_norm, device=sums.device).float()])
            step += 1
            window_steps += 1
            progress.advance(step)

            # Host sync only here, every log_every steps: the loss, grad norm and NaN check ride on it.
            if step % tc.log_every == 0 or step == tc.steps:
                mean_loss, mean_grad = (accelerator.reduce(sums, "mean") / window_steps).tolist()
                for name, value in (("loss", mean_loss), ("gradient norm", mean_grad)):
                    if not math.isfinite(value):
                        raise DiffxError(f"{name} became {value} between steps {step - window_steps + 1} and {step}; "
                                         "lower train.lr or set train.grad_clip")
                now = time.perf_counter()
                rate = window_steps / (now - window_start)
                progress.update(step, mean_loss)
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": mean_loss, "grad_norm": mean_grad,
                                            "lr": scheduler.get_last_lr()[0],
                                            "it_s": rate, "time": time.time()}) + "\n")
                sums.zero_()
                window_start, window_steps = now, 0
            if step % tc.save_every == 0 or step == tc.steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    checkpoint.save(run_dir / "model.safetensors", ema.state_dict(), parts_cfg, spec, step)
                    save_state(run_dir, accelerator, model, ema, optimizer, scheduler, step)
    if accelerator.is_main_process:
        accelerator.print(f"saved {run_dir / 'model.safetensors'} (step {step})")
    return run_dir


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _summary(model, parts, n_images: int, tc, step: int, accelerator) -> str:
    """One line before the loop: what will run, and where."""
    params = sum(p.numel() for p in model.parameters())
    spec, start = parts.spec, f", resuming at step {step}" if step else ""
    ranks = f" per process x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    shape = (spec.channels, spec.image_size, spec.image_size)
    space = "" if parts.x0_shape == shape else f" in a {type(parts.latent).__name__} latent space {'x'.join(map(str, parts.x0_shape))}"
    return (f"training {type(getattr(model, 'net', model)).__name__} ({params / 1e6:.2f} M parameters) on "
            f"{n_images} images {'x'.join(map(str, shape))}{space} "
            f"(condition: {parts.condition.description}): {tc.steps} steps{start}, batch {tc.batch_size}{ranks}, "
            f"device {accelerator.device}, precision {accelerator.mixed_precision}")
