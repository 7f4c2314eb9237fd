"""``diffx train-vae``: train the KL autoencoder that latent diffusion works in, through Accelerate.

Reads top to bottom: data (the last ``train.holdout`` images held out) -> autoencoder (and a PatchGAN
once ``train.disc_weight > 0``) -> optimizer -> prepare -> loop (reconstruction + KL [+ adversarial]
loss, backward, clip, step, EMA) -> log -> atomic ``vae.safetensors`` with the latent scale fitted at
each save, and a resume state -> the held-out PSNR and a reconstruction grid.

No perceptual (LPIPS) loss: it needs downloaded network weights. The reconstruction loss is L1 (ldm).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from diffx import resume, vae
from diffx.atomic import atomic_write
from diffx.build import DataSpec
from diffx.ema import EMA
from diffx.errors import DiffxError
from diffx.images import grid, save_png, to_uint8
from diffx.lr_schedules import Constant
from diffx.models.autoencoder import kl_divergence
from diffx.models.discriminator import adaptive_weight, frozen_logits, generator_loss, hinge_d_loss
from diffx.preemption import Preemption
from diffx.progress import TrainProgress, log_line
from diffx.resume import EpochSampler, save_state

LOGGED = ("loss", "rec_l1", "kl", "g_loss", "d_loss", "grad_norm")  # summed over each log window


class Trainee(nn.Module):
    """What the optimizer trains: the autoencoder, and the discriminator when there is one. One
    forward returns every loss, and their sum has exactly the gradients each part needs, so one
    backward (and one DDP gradient sync) serves both.

    Rombach et al. 2022, App. G (ldm's ``LPIPSWithDiscriminator`` without LPIPS and with its learned
    log-variance left at 0): ``L = |x - D(E(x))|_1 + kl_weight * KL + [lambda * L_G + L_D]``. ldm sums
    the L1 over pixels and the KL over latent elements; both are divided here by the pixels per image,
    which keeps ldm's ratio (so its ``kl_weight`` of 1e-6 means the same) and a loss of readable size.
    """

    def __init__(self, autoencoder: nn.Module, discriminator: nn.Module | None, kl_weight: float,
                 disc_weight: float, disc_start: int):
        super().__init__()
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.kl_weight, self.disc_weight, self.disc_start = kl_weight, disc_weight, disc_start

    def forward(self, x: Tensor, step: int) -> Tensor:
        """Images (B, C, H, W) -> the losses, ``LOGGED[:-1]``, stacked: (5,); the first is the one to minimise."""
        recon, mean, logvar = self.autoencoder(x)
        rec = (x - recon).abs().mean()
        kl = kl_divergence(mean.float(), logvar.float()).mean() / x[0].numel()
        loss, g_loss, d_loss = rec + self.kl_weight * kl, torch.zeros_like(rec), torch.zeros_like(rec)
        if self.discriminator is not None and step >= self.disc_start:
            # The generator's term sees D frozen; D's own sees the reconstruction detached.
            g_loss = generator_loss(frozen_logits(self.discriminator, recon))
            weight = self.disc_weight * adaptive_weight(rec, g_loss, self.autoencoder.decoder[-1].weight)
            d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(recon.detach()))
            loss = loss + weight * g_loss + d_loss
        return torch.stack([loss, rec, kl, g_loss, d_loss]).float()


def train_vae(cfg: DictConfig) -> Path:
    """Train the configured autoencoder; returns the run directory holding ``vae.safetensors``."""
    tc = cfg.train
    run_dir = Path(cfg.run_dir)
    # The discriminator is idle before train.disc_start: DDP must not wait for its gradients then.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if tc.disc_weight > 0 else []
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu, step_scheduler_with_optimizer=False,
                              kwargs_handlers=ddp)
    set_seed(cfg.seed, device_specific=True)

    # 1. data: the last train.holdout images measure the PSNR and are never trained on
    data = instantiate(cfg.data)
    spec = DataSpec.of(data)
    n = len(data.dataset)
    if n - tc.holdout < tc.batch_size:
        raise DiffxError(f"train.holdout={tc.holdout} leaves {n - tc.holdout} of the {n} images to train on, fewer "
                         f"than train.batch_size={tc.batch_size}; lower train.holdout or use more data")
    train_set = torch.utils.data.Subset(data.dataset, range(n - tc.holdout))
    held_out = torch.utils.data.Subset(data.dataset, range(n - tc.holdout, n))

    # 2. the parts, shaped by the data
    autoencoder = instantiate(cfg.autoencoder, in_channels=spec.channels, image_size=spec.image_size)
    discriminator = (instantiate(cfg.discriminator, in_channels=spec.channels, image_size=spec.image_size)
                     if tc.disc_weight > 0 else None)
    trainee = Trainee(autoencoder, discriminator, tc.kl_weight, tc.disc_weight, tc.disc_start)

    # 3. optimizer, warm-up, EMA of the autoencoder (the saved weights; ema_decay=0 keeps the last ones), loader
    ema = EMA(autoencoder, tc.ema_decay)
    optimizer = instantiate(cfg.optimizer, params=trainee.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Constant(tc.warmup, tc.steps))
    sampler = EpochSampler(len(train_set), seed=cfg.seed)
    # The loader has its own generator: the global RNG draws the posterior samples.
    loader = torch.utils.data.DataLoader(train_set, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=tc.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    model, optimizer, loader, scheduler = accelerator.prepare(trainee, optimizer, loader, scheduler)
    ema.model.to(accelerator.device)

    step = resume.start(run_dir, cfg, accelerator, model, ema, optimizer, scheduler)

    stored = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("autoencoder", "data")}
    log_path = run_dir / "log.jsonl"
    batches = resume.batches(loader, sampler, start=step)
    sums = torch.zeros(len(LOGGED), device=accelerator.device)
    window_start, window_steps = time.perf_counter(), 0
    accelerator.print(_summary(autoencoder, discriminator, spec, len(train_set), tc, step, accelerator))

    # 4. the loop; a signal (SIGTERM, SIGINT, SIGUSR1) stops it after the current step, saved (diffx/preemption.py)
    model.train()
    with Preemption() as preemption, TrainProgress(tc.steps, start=step, enabled=accelerator.is_main_process) as progress:
        while step < tc.steps:
            losses = model(next(batches)["x"], step)
            accelerator.backward(losses[0])
            # The norm is computed either way (max_norm=inf clips nothing): it is logged and NaN-checked.
            grad_norm = accelerator.clip_grad_norm_(accelerator.unwrap_model(model).autoencoder.parameters(),
                                                    tc.grad_clip or math.inf)
            optimizer.step()
            if optimizer.step_was_skipped:  # fp16: the loss scaler probing its range, not a diverging run
                grad_norm = torch.zeros(())
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(accelerator.unwrap_model(model).autoencoder)
            sums += torch.cat([losses.detach(), torch.as_tensor(grad_norm, device=sums.device).float()[None]])
            step += 1
            window_steps += 1
            progress.advance(step)

            # Host sync only here, every log_every steps: the losses and the NaN check ride on it.
            if step % tc.log_every == 0 or step == tc.steps:
                means = dict(zip(LOGGED, (accelerator.reduce(sums, "mean") / window_steps).tolist()))
                bad = [f"{k} became {v}" for k, v in means.items() if not math.isfinite(v)]
                if bad:
                    raise DiffxError(f"{bad[0]} between steps {step - window_steps + 1} and {step}; "
                                     "lower train.lr or set train.grad_clip")
                now = time.perf_counter()
                progress.update(step, means["loss"])
                if accelerator.is_main_process:
                    log_line(log_path, step, {**means, "lr": scheduler.get_last_lr()[0],
                                              "it_s": window_steps / (now - window_start)})
                sums.zero_()
                window_start, window_steps = now, 0
            save, stop = preemption.save_point(step, tc, accelerator)
            if save:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    # The latent scale is fitted to these weights, on the images they were trained on.
                    scale, shift = vae.fit_scale_shift(ema.model, _images(train_set), accelerator.device)
                    vae.save(run_dir / "vae.safetensors", ema.state_dict(), stored, spec, step, scale, shift)
                    save_state(run_dir, accelerator, model, ema, optimizer, scheduler, step)
            if stop:
                raise preemption.stopped("train-vae", run_dir, step, accelerator.is_main_process)

    # 5. held-out reconstructions: PSNR and a grid
    if accelerator.is_main_process:
        score = _evaluate(ema.model, held_out, run_dir, step, accelerator.device)
        accelerator.print(f"held-out PSNR {score:.2f} dB over {len(held_out)} images; saved "
                          f"{run_dir / 'vae.safetensors'} (step {step}), {run_dir / 'recon.png'}")
    return run_dir


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, of images in [-1, 1] read as [0, 255]:
    ``10 log10(255^2 / MSE)``. (B, C, H, W) x 2 -> (B,)."""
    err = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) * 127.5).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / err.clamp_min(1e-10))


@torch.no_grad()
def _evaluate(autoencoder: nn.Module, held_out, run_dir: Path, step: int, device, show: int = 32) -> float:
    """Reconstruct the held-out images from their posterior means; write ``vae_eval.json`` (mean PSNR) and
    ``recon.png`` (the first ``show`` originals above their reconstructions)."""
    x, recon = [], []
    for batch in _images(held_out):
        x.append(batch["x"])
        recon.append(autoencoder.decode(autoencoder.encode(batch["x"].to(device))[0]).cpu())
    x, recon = torch.cat(x), torch.cat(recon)
    scores = psnr(recon, x)
    report = {"psnr_db": scores.mean().item(), "psnr_db_min": scores.min().item(), "images": len(x), "step": step}
    atomic_write(run_dir / "vae_eval.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    upscale = max(1, 64 // x.shape[-1])
    rows = [grid(to_uint8(images[:show]), upscale=upscale) for images in (x, recon)]
    save_png(run_dir / "recon.png", np.concatenate(rows, axis=0),
             {"top": "held-out images", "bottom": "reconstructions", "psnr_db": f"{report['psnr_db']:.2f}"})
    return report["psnr_db"]


def _images(dataset, batch_size: int = 64):
    """The dataset in order, in batches (no shuffling, no RNG)."""
    # Its own generator: a loader seeds its iterator from the global RNG otherwise, which the training
    # loop's posterior samples draw from.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())


def _summary(autoencoder, discriminator, spec: DataSpec, n_train: int, tc, step: int, accelerator) -> str:
    """One line before the loop: what will run, and where."""
    params = sum(p.numel() for p in autoencoder.parameters())
    side = spec.image_size // autoencoder.factor
    gan = (f"PatchGAN ({sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f} M) from step {tc.disc_start}"
           if discriminator is not None else "no discriminator")
    start = f", resuming at step {step}" if step else ""
    ranks = f" per process x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    return (f"training {type(autoencoder).__name__} ({params / 1e6:.2f} M parameters; factor {autoencoder.factor}, "
            f"latent {autoencoder.latent_channels}x{side}x{side}) on {n_train} images "
            f"{spec.channels}x{spec.image_size}x{spec.image_size} ({tc.holdout} held out), {gan}: "
            f"{tc.steps} steps{start}, batch {tc.batch_size}{ranks}, device {accelerator.device}, "
            f"precision {accelerator.mixed_precision}")

