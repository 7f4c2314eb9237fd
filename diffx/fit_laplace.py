"""``diffx fit-laplace``: a Bayesian last layer for a checkpoint (``diffx.uncertainty.laplace``).

    diffx fit-laplace ckpt=runs/<run>/model.safetensors            # -> runs/<run>/laplace.safetensors
    diffx sample ckpt=runs/<run>/model.safetensors uncertainty.enabled=true

Training pairs ``(x_t, t)`` are drawn as training draws them (the checkpoint's own data, t from the
objective, the null condition at rate ``cond_drop``) and streamed through the frozen model; the Gram
matrix of the output layer's inputs, the weighted squared error and the count are summed. The prior
precision and the noise scale maximise the Laplace marginal likelihood unless given, and the
posterior is written beside the checkpoint with the sha256 of the model file it belongs to.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from diffx import checkpoint, conditioning
from diffx.errors import DiffxError
from diffx.generate import resolve_device
from diffx.tensors import bcast
from diffx.trust import check_params
from diffx.uncertainty import laplace
from diffx.vae import sha256


def fit_laplace(cfg: DictConfig) -> Path:
    """Fit the last-layer posterior of ``cfg.ckpt``; returns the sidecar's path."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx fit-laplace ckpt=runs/<run>/model.safetensors")
    if cfg.structure not in laplace.STRUCTURES:
        raise DiffxError(f"structure={cfg.structure}: expected one of {', '.join(laplace.STRUCTURES)}")
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "laplace.safetensors"
    if out.exists() and not cfg.overwrite:
        raise DiffxError(f"{out} already exists; choose another out= or pass overwrite=true")
    device = resolve_device(cfg.device)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    model, objective, condition = parts.model, parts.objective, parts.condition
    head = laplace.head_of(model, f"ckpt={cfg.ckpt}")
    console = Console()

    # 1. the checkpoint's own training data (its stored config, checked like the rest), as training reads it
    data_cfg = OmegaConf.merge(OmegaConf.create(ckpt.parts.get("data") or {}), cfg.data)
    if not data_cfg.get("_target_"):
        raise DiffxError(f"ckpt={cfg.ckpt}: its metadata records no data config to fit on")
    check_params(data_cfg, "data")
    data = instantiate(data_cfg)
    condition.prepare(data.dataset.captions, device)
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)  # t, noise and condition dropout, on the device

    # 2. stream (x_t, t) pairs through the frozen model and sum the head's curvature
    curvature, t0 = laplace.Curvature.zeros(head), time.time()
    batches = iter(loader)
    with torch.no_grad():
        while curvature.pairs < cfg.pairs:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            x0 = parts.latent.encode(batch["x"].to(device))
            null = condition.null(x0.shape[0], device)
            cond = conditioning.drop(condition(batch, device), cfg.cond_drop, null, generator=generator)
            t = objective.sample_t(x0.shape[0], device=x0.device, generator=generator)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            alpha, sigma = objective.schedule.alpha_sigma(t)
            xt = bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise
            f = model.features(xt, t, cond)
            pred = model.to_image(head(f))
            curvature.add(head, f, pred, objective.target(x0, noise, t), objective.weight(t))
    console.print(f"curvature: {curvature.pairs} training pairs in {time.time() - t0:.1f} s "
                  f"(head {type(head).__name__} {list(head.weight.shape)}, {curvature.gram.shape[0]} inputs per output)")

    # 3. prior precision and noise scale, then the posterior, tied to this model file
    delta, noise_scale, evidence = laplace.fit_hyperparameters(curvature, cfg.structure, cfg.prior_precision,
                                                               cfg.noise)
    info = {"ckpt": str(cfg.ckpt), "ckpt_step": ckpt.step, "pairs": curvature.pairs, "seed": cfg.seed,
            "log_marginal_likelihood": evidence, "head": f"{type(head).__name__}{list(head.weight.shape)}",
            "fitted": [k for k in ("prior_precision", "noise") if cfg[k] is None]}
    posterior = laplace.Posterior.from_curvature(curvature, cfg.structure, delta, noise_scale, sha256(cfg.ckpt), info)
    laplace.save(out, posterior)
    console.print(f"structure={cfg.structure}: prior precision {delta:.4g}, noise {noise_scale:.4g}, "
                  f"log evidence {evidence:.6g}\nwrote {out}\nuse: diffx sample ckpt={cfg.ckpt} uncertainty.enabled=true")
    return out
