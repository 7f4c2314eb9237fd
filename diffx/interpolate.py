"""``diffx interpolate``: DDIM interpolation between two seeds (Song et al. 2021, sec. 5.3) -> a strip PNG
and an animated GIF.

    diffx interpolate ckpt=runs/<run>/model.safetensors seeds=[0,1] frames=8
    diffx interpolate ckpt=... seeds=[0,0] label=[0,5] frames=8        # the same noise, two classes

Frame k of ``frames`` sits at ``w = k / (frames - 1)``. Its start noise is the spherical interpolation of
the two seeds' start noises (``diffx.noise.slerp``); when the two ends have different conditions (a
pair of labels or prompts, or ``label=random``'s label of each seed) its denoiser is the mixture
``(1 - w) D(x | c_a) + w D(x | c_b)`` of the two guided predictions (``diffx.generate.Mixture``: class
labels are integers and cannot be interpolated themselves). The sampler must be deterministic, so a
frame is a function of its start noise and the frames change smoothly; the first and last frames are
``diffx sample``'s images of the two seeds (same sampler, steps and cfg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console

from diffx import checkpoint, noise, precision
from diffx.atomic import atomic_write
from diffx.errors import DiffxError
from diffx.generate import Request, check_guidance, generate, resolve_device, sampling_plan, start_noise
from diffx.images import save_png

FRAME_MS = 120  # GIF frame duration


def interpolate(cfg: DictConfig) -> list[Path]:
    """Draw ``cfg.frames`` frames from seed a to seed b; returns the strip PNG and the GIF paths."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx interpolate ckpt=runs/<run>/model.safetensors seeds=[0,1]")
    device = resolve_device(cfg.device)
    precision.check(cfg.precision)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    parts = precision.apply(parts, cfg.precision, device)
    check_guidance(cfg.cfg, parts, cfg.ckpt)
    plan = sampling_plan(cfg, parts.objective.schedule, ckpt.sampling)
    check_plan(plan)
    a, b = (int(s) for s in cfg.seeds)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "interpolations"
    files = [out / f"seed{a:06d}-{b:06d}.png", out / f"seed{a:06d}-{b:06d}.gif"]
    clash = [f for f in files if f.exists()]
    if clash and not cfg.overwrite:
        raise DiffxError(f"{clash[0]} already exists; choose another out= or seeds=, or pass overwrite=true")

    weights = [k / (cfg.frames - 1) for k in range(cfg.frames)]
    z = start_noise(parts, noise.generators([a, b]), device)  # (2, C, H, W): the two seeds' own noises
    ends = parts.condition.inputs(cfg, [a, b])  # each end's label or prompt, as diffx sample picks them
    negatives = [cfg.negative_prompt] * cfg.frames if cfg.negative_prompt else None
    request = Request(
        seeds=[a] * cfg.frames,  # a deterministic sampler draws no fresh noise from them
        inputs=[ends[0]] * cfg.frames, negatives=negatives, cfg=cfg.cfg,
        noise=torch.stack([noise.slerp(z[0], z[1], w) for w in weights]),
        others=None if ends[0] == ends[1] else [ends[1]] * cfg.frames, weights=weights)
    images, nfe = generate(parts, plan, request, cfg.batch_size, device)

    upscale = max(1, 128 // ckpt.spec.image_size)
    text = {"seeds": f"{a},{b}", "frames": cfg.frames, "ends": " -> ".join(map(str, ends)), "sampler": plan.name,
            "steps": plan.steps, "nfe": nfe, "cfg": cfg.cfg, "ckpt": str(cfg.ckpt), "step": ckpt.step}
    save_png(files[0], strip(images, upscale=upscale), text)
    save_gif(files[1], images, upscale)
    Console().print(f"wrote {cfg.frames} frames from seed {a} to seed {b} ({plan.name}, {plan.steps} steps, "
                    f"{nfe} NFE per batch, cfg={cfg.cfg}): {files[0]}\nanimation: {files[1]}")
    return files


def check_plan(plan) -> None:
    """Interpolation needs a deterministic sampler: with fresh noise per step a frame is not a function of
    its start noise, and neighbouring frames would not be neighbours."""
    if not plan.deterministic:
        raise DiffxError(f"sampler={plan.name} is stochastic: interpolation needs a deterministic sampler "
                         "(sampler=ddim with eta=0, euler, heun, dpmpp, unipc ...)")


def strip(images: np.ndarray, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """(N, H, W, C) -> one row (H', W', C) on white, optionally upscaled by pixel repetition."""
    n, h, w, c = images.shape
    out = np.full((h + 2 * pad, n * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        out[pad: pad + h, pad + k * (w + pad): pad + k * (w + pad) + w] = image
    return out.repeat(upscale, 0).repeat(upscale, 1) if upscale > 1 else out


def save_gif(path: Path, images: np.ndarray, upscale: int = 1) -> None:
    """An endless GIF that plays a to b and back (so the loop has no jump), written atomically."""
    frames = [Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f)
              for f in images.repeat(upscale, 1).repeat(upscale, 2)]
    frames = frames + frames[-2:0:-1]
    atomic_write(Path(path), lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                        duration=FRAME_MS, loop=0))
