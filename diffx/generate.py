"""The generation layer: a checkpoint's parts and a request -> images.

Every command that draws from a model (``sample``, ``eval``, ``calibrate``, and later interpolation,
img2img, distillation and uncertainty) goes through here, so the start noise (its shape through the
latent space, one seed per image), the denoiser with its guidance, the conditions and the decoding
are written once. Image i uses its own seed whatever the batch it falls in, so a batch size never
changes an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor

from diffx import noise
from diffx.build import Parts
from diffx.errors import DiffxError
from diffx.images import to_uint8
from diffx.samplers import plan as plans
from diffx.samplers.denoiser import Denoiser, make_denoiser


@dataclass
class Request:
    """What to draw: per image its seed and the condition source's input (a label, a prompt, None);
    the negative inputs guidance steers away from (None: the null condition); the guidance scale."""

    seeds: list[int]
    inputs: list
    negatives: list | None = None
    cfg: float = 1.0


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    return torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def sampling_plan(cfg, schedule) -> plans.Plan:
    """The sampling plan a command's config asks for: ``sampler=``, ``grid=`` and ``steps=``."""
    return plans.make(instantiate(cfg.sampler), instantiate(cfg.grid), cfg.get("steps"), schedule)


def check_guidance(scale: float, parts: Parts, ckpt) -> None:
    """Guidance (``cfg != 1``) needs a condition to steer by."""
    if scale != 1.0 and not parts.condition.guidable:
        raise DiffxError(f"cfg={scale} needs a conditional model, but {ckpt} is unconditional; use cfg=1")


def start_noise(parts: Parts, generators: list[torch.Generator], device) -> Tensor:
    """(N, C, H, W) standard normal noise in the model's space, row i from ``generators[i]``
    (``noise.generators(seeds)``: one per image)."""
    return noise.randn((len(generators), *parts.x0_shape), generators, device)


def denoiser(parts: Parts, inputs: list, negatives: list | None, scale: float, device) -> Denoiser:
    """The denoiser for one batch: its conditions encoded, guided at ``scale``, x0 clipped to the
    latent space's range."""
    condition = parts.condition
    cond = condition.encode(inputs, device)
    uncond = condition.null(len(inputs), device) if negatives is None else condition.encode(negatives, device)
    return make_denoiser(parts.model, parts.objective, cond, uncond, cfg_scale=scale, x0_range=parts.latent.x0_range)


def generate(parts: Parts, plan: plans.Plan, request: Request, batch_size: int, device) -> tuple[np.ndarray, int]:
    """Images (N, H, W, C) uint8 for ``request``, in batches of ``batch_size``, and the NFE per batch."""
    images, nfe = [], 0
    for lo in range(0, len(request.seeds), batch_size):
        seeds = request.seeds[lo: lo + batch_size]
        negatives = None if request.negatives is None else request.negatives[lo: lo + len(seeds)]
        gens = noise.generators(seeds)
        x = start_noise(parts, gens, device)
        denoise = denoiser(parts, request.inputs[lo: lo + len(seeds)], negatives, request.cfg, device)
        x0 = plan(denoise, parts.objective.schedule, x, generator=gens)
        images.append(to_uint8(parts.latent.decode(x0)))
        nfe = denoise.nfe
    return np.concatenate(images), nfe
