"""``diffx train``: build the parts from the config, then the training loop, through Accelerate.

Reads top to bottom: data -> parts -> optimizer -> prepare -> loop (loss, backward, clip, step,
EMA) -> log (and a tracker) -> atomic checkpoints and a resume state -> sample grids; at the end the
EMA model's loss on a fixed probe batch (metrics.json) and the loss curve (loss.png), diffx.monitor.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffx import allocator, checkpoint, conditioning, monitor, resume, trackers
from diffx.build import DataSpec, build, parts_config
from diffx.config import launched_processes
from diffx.ema import EMA
from diffx.errors import DiffxError
from diffx.latent import encode_once
from diffx.metrics import suite
from diffx.preemption import Preemption
from diffx.progress import TrainProgress, log_line
from diffx.resume import EpochSampler, save_state


def train(cfg: DictConfig) -> Path:
    """Train the configured model; returns the run directory holding ``model.safetensors``."""
    tc = cfg.train
    run_dir = Path(cfg.run_dir)
    # The loop steps the LR schedule once per optimizer step; Accelerate's default would step it once
    # per process, running the schedule N times too fast on N processes. Each optimizer step sums the
    # gradients of train.grad_accum micro-batches; the count must not restart where the loader's epoch
    # ends (Accelerate's default), or the step at each epoch boundary would see fewer of them.
    accumulation = GradientAccumulationPlugin(num_steps=tc.grad_accum, sync_with_dataloader=False)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu, step_scheduler_with_optimizer=False,
                              gradient_accumulation_plugin=accumulation,
                              log_with=trackers.check(tc.log_with), project_dir=str(run_dir / "trackers"))
    started = time.time()
    if tc.keep_freed_memory:  # no page faults per step from freed activations (diffx.allocator)
        allocator.keep_freed_memory()
    set_seed(cfg.seed, device_specific=True)
    if launched_processes() > accelerator.num_processes:  # e.g. torchrun on CPUs without train.cpu=true
        raise DiffxError(f"{launched_processes()} processes were launched but Accelerate set up {accelerator.num_processes} "
                         "(it found no GPU for them); add train.cpu=true to train on CPUs (gloo)")

    # 1. data and the shapes it decides, then the parts built for them
    data = instantiate(cfg.data)
    spec = DataSpec.of(data)
    if len(data.dataset) < tc.batch_size * accelerator.num_processes:  # train.batch_size is per process
        raise DiffxError(f"train.batch_size={tc.batch_size} x {accelerator.num_processes} process(es) is larger than "
                         f"the dataset ({len(data.dataset)} images)")
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
                                         pin_memory=accelerator.device.type == "cuda",  # page-locked: DMA copies
                                         # its own generator: starting an epoch must not draw from the
                                         # global RNG, or a resumed run would diverge from a straight one
                                         generator=torch.Generator().manual_seed(cfg.seed))

    # 3. optimizer and learning-rate schedule
    ema = EMA(model, tc.ema_decay)
    optimizer = instantiate(cfg.optimizer, params=model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, instantiate(cfg.lr_schedule, warmup=tc.warmup, total=tc.steps))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema.model.to(accelerator.device)
    # Only the forward pass goes through the compiled wrapper; the state, EMA and checkpoints read the
    # module itself, so their weight names never carry the wrapper's "_orig_mod." prefix.
    forward = torch.compile(model, backend=tc.compile_backend) if tc.compile else model

    # The loss's random draws (condition dropout and t; the noise) come from these, seeded alike on every
    # process, and are made for all processes' samples at once (_round_draws): a run is the same
    # computation on 1 or N processes at the same N x batch_size, and resumes on either.
    draws = (torch.Generator().manual_seed(cfg.seed), torch.Generator(accelerator.device).manual_seed(cfg.seed + 1))
    step = resume.start(run_dir, cfg, accelerator, model, ema, optimizer, scheduler, draws)

    parts_cfg = parts_config(cfg)
    parts_cfg["latent"].update(latent.record())  # e.g. the VAE's sha256: sampling refuses another VAE
    log_path = run_dir / "log.jsonl"
    batches = resume.batches(loader, sampler, start=step * tc.grad_accum)  # the position counts micro-batches
    sums = torch.zeros(2, device=accelerator.device)  # [loss, grad norm] summed over the log window
    window_start, window_steps = time.perf_counter(), 0

    # Every batch has the same size (drop_last), so the null condition is encoded once, not per step.
    condition.prepare(data.dataset.captions, accelerator.device)
    null = condition.null(tc.batch_size, accelerator.device)
    accelerator.print(_summary(accelerator.unwrap_model(model), parts, len(data.dataset), tc, step, accelerator))
    trackers.start(accelerator, cfg, run_dir)  # train.log_with: a tracker beside log.jsonl, or none
    preview_inputs = monitor.preview_inputs(condition, data.dataset.captions) if tc.sample_every else None

    # 4. the loop; a signal (SIGTERM, SIGINT, SIGUSR1) stops it after the current step, saved (diffx/preemption.py)
    model.train()
    with Preemption() as preemption, TrainProgress(tc.steps, start=step, enabled=accelerator.is_main_process) as progress:
        while step < tc.steps:
            # One optimizer step over train.grad_accum micro-batches: backward divides each loss by their
            # number and the gradients add up, so the step sees the mean over all of them.
            loss = torch.zeros((), device=accelerator.device)
            for _ in range(tc.grad_accum):
                with accelerator.accumulate(model):
                    batch = next(batches)
                    x0 = to_x0(batch["x"])
                    # Labels or captions -> cond; the null one (label -1, empty prompt) replaces it at rate cond_drop.
                    keep, t, noise = _round_draws(objective, draws, x0, tc.cond_drop, accelerator)
                    cond = conditioning.drop(condition(batch, accelerator.device), tc.cond_drop, null, keep=keep)
                    micro_loss = objective.loss(forward, x0, cond, t=t, noise=noise).mean()
                    accelerator.backward(micro_loss)
                    loss += micro_loss.detach().float() / tc.grad_accum
            # The norm is computed either way (max_norm=inf clips nothing): it is logged and NaN-checked.
            grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf),
                                        device=sums.device).float()
            optimizer.step()
            if optimizer.step_was_skipped:
                # fp16: the loss scaler skipped a step whose scaled gradients overflowed, and lowered its
                # scale. That inf norm is the scaler probing its range, not a diverging run: not logged.
                grad_norm = torch.zeros_like(grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(accelerator.unwrap_model(model))
            sums += torch.stack([loss, grad_norm])
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
                row = {"loss": mean_loss, "grad_norm": mean_grad, "lr": scheduler.get_last_lr()[0], "it_s": rate}
                accelerator.log(row, step=step)  # the tracker, if any
                if accelerator.is_main_process:
                    log_line(log_path, step, row)
                sums.zero_()
                window_start, window_steps = now, 0
            save, stop = preemption.save_point(step, tc, accelerator)
            if save:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    checkpoint.save(run_dir / "model.safetensors", ema.state_dict(), parts_cfg, spec, step)
                    save_state(run_dir, accelerator, model, ema, optimizer, scheduler, step, tc, draws)
            if tc.sample_every and step % tc.sample_every == 0 and accelerator.is_main_process:
                path = run_dir / "samples" / f"step{step:06d}.png"
                monitor.save_preview(path, parts, ema.model, preview_inputs, step, accelerator.device)
            if tc.eval_every and step % tc.eval_every == 0 and accelerator.is_main_process:
                # sample metrics of the EMA weights (diffx.metrics), logged beside the loss, with their grid
                scores = suite.during_training(list(tc.eval_metrics), parts, ema.model, parts_cfg["data"], data,
                                               suite.Options(samples=tc.eval_samples, reference_images=tc.eval_reference,
                                                             seed=0),
                                               tc.eval_cfg, accelerator.device,
                                               run_dir / "samples" / f"eval_step{step:06d}.png")
                accelerator.log(scores, step=step)
                log_line(log_path, step, scores)
            if stop:
                raise preemption.stopped("train", run_dir, step, accelerator.is_main_process)

    # 5. the EMA model's loss on a fixed probe batch (metrics.json: what a sweeper minimises), loss.png
    if accelerator.is_main_process:
        probe = monitor.probe_loss(ema.model, objective, condition, dataset, to_x0, accelerator.device)
        accelerator.log({"probe_loss": probe}, step=step)
        monitor.write_results(run_dir, {"step": step, "probe_loss": probe, "seconds": time.time() - started})
        accelerator.print(f"saved {run_dir / 'model.safetensors'} (step {step}); "
                          f"EMA loss on the probe batch {probe:.4f} (metrics.json)")
    trackers.finish(accelerator)
    return run_dir


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _round_draws(objective, draws, x0: torch.Tensor, p_drop: float, accelerator):
    """This process's rows of one round's random draws: which samples keep their condition, t and the
    noise, drawn for all ``processes x B`` samples of the round alike on every process. Accelerate's
    loader gives process r the r-th batch of B of the round, so its rows are ``r*B .. (r+1)*B``: each
    sample gets what it would get in a 1-process run of batch ``processes x B``. Condition dropout
    and t are drawn on the CPU (every t sampler can draw there), the noise on the device."""
    cpu, device = draws
    b = x0.shape[0]
    n, rows = b * accelerator.num_processes, slice(accelerator.process_index * b, (accelerator.process_index + 1) * b)
    keep = (torch.rand(n, generator=cpu)[rows] >= p_drop).to(x0.device)
    t = objective.sample_t(n, generator=cpu)[rows].to(x0.device)
    noise = torch.randn((n, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, generator=device)[rows]  # (B, C, H, W)
    return keep, t, noise


def _summary(model, parts, n_images: int, tc, step: int, accelerator) -> str:
    """One line before the loop: what will run, and where."""
    params = sum(p.numel() for p in model.parameters())
    spec, start = parts.spec, f", resuming at step {step}" if step else ""
    ranks = f" per process x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    accum = f" x {tc.grad_accum} accumulated" if tc.grad_accum > 1 else ""
    shape = (spec.channels, spec.image_size, spec.image_size)
    space = "" if parts.x0_shape == shape else f" in a {type(parts.latent).__name__} latent space {'x'.join(map(str, parts.x0_shape))}"
    return (f"training {type(getattr(model, 'net', model)).__name__} ({params / 1e6:.2f} M parameters) on "
            f"{n_images} images {'x'.join(map(str, shape))}{space} "
            f"(condition: {parts.condition.description}): {tc.steps} steps{start}, batch {tc.batch_size}{accum}{ranks}, "
            f"device {accelerator.device}, precision {accelerator.mixed_precision}")
