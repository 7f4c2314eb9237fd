"""``diffx sample``: checkpoint -> rebuild the parts -> sampler -> decode -> PNG files and a grid.

Image i uses seed ``seed + i`` for its start noise and its label, so it is the same whatever the
batch size. The sampler and its grid are chosen now, not at training time.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from rich.console import Console

from diffx import checkpoint, noise
from diffx.errors import DiffxError
from diffx.images import grid, save_png, to_uint8
from diffx.samplers import make_denoiser


def sample(cfg: DictConfig) -> list[Path]:
    """Generate ``cfg.n`` images from ``cfg.ckpt``; returns the PNG paths (the grid last)."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx sample ckpt=runs/<run>/model.safetensors")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    spec, schedule = ckpt.spec, parts.objective.schedule
    if cfg.cfg != 1.0 and spec.num_classes == 0:
        raise DiffxError(f"cfg={cfg.cfg} needs a conditional model, but {cfg.ckpt} is unconditional; use cfg=1")

    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "samples"
    seeds = [cfg.seed + i for i in range(cfg.n)]
    files = [out / f"seed{s:06d}.png" for s in seeds] + [out / f"grid_seed{seeds[0]:06d}-{seeds[-1]:06d}.png"]
    clash = [f for f in files if f.exists()]
    if clash and not cfg.overwrite:
        raise DiffxError(f"{clash[0]} already exists ({len(clash)} of the outputs do); "
                         "choose another out= or seed=, or pass overwrite=true")
    labels = _labels(cfg.label, seeds, spec)

    sampler, ts = instantiate(cfg.sampler), instantiate(cfg.grid)(cfg.steps, schedule)
    c = parts.latent.channels(spec.channels)
    size = spec.image_size // parts.latent.factor
    images, nfe = [], 0
    for lo in range(0, cfg.n, cfg.batch_size):
        chunk = seeds[lo: lo + cfg.batch_size]
        gens = noise.generators(chunk)
        x = noise.randn((len(chunk), c, size, size), gens, device)
        cond = {"label": torch.tensor(labels[lo: lo + len(chunk)], device=device)} if labels else None
        denoise = make_denoiser(parts.model, parts.objective, cond, cfg_scale=cfg.cfg)
        x0 = sampler(denoise, schedule, x, ts, generator=gens)
        images.append(to_uint8(parts.latent.decode(x0)))
        nfe = denoise.nfe
    images = np.concatenate(images)

    out.mkdir(parents=True, exist_ok=True)
    sampler_name = cfg.sampler._target_.rsplit(".", 1)[-1]
    for i, (seed, path) in enumerate(zip(seeds, files)):
        text = {"seed": seed, "sampler": sampler_name, "steps": cfg.steps, "nfe": nfe, "cfg": cfg.cfg,
                "ckpt": str(cfg.ckpt), "step": ckpt.step}
        if labels:
            text.update(label=labels[i], class_name=spec.class_names[labels[i]])
        save_png(path, images[i], text)
    save_png(files[-1], grid(images, upscale=max(1, 128 // spec.image_size)))
    Console().print(f"wrote {cfg.n} images ({sampler_name}, {cfg.steps} steps, {nfe} NFE per batch, cfg={cfg.cfg}) "
                    f"to {out}\ngrid: {files[-1]}")
    return files


def _labels(label, seeds: list[int], spec) -> list[int] | None:
    """Class label per image: ``random`` (drawn from the image's seed), ``all`` (every class in
    turn), one index or class name, or a list of them cycled."""
    if spec.num_classes == 0:
        if label not in (None, "random"):
            raise DiffxError(f"label={label}: this checkpoint is unconditional (it has no classes)")
        return None
    if label is None or label == "random":
        return [random.Random(s).randrange(spec.num_classes) for s in seeds]
    if label == "all":
        label = list(range(spec.num_classes))
    chosen = list(label) if isinstance(label, (list, tuple, ListConfig)) else [label]
    ids = [_label_id(v, spec) for v in chosen]
    return [ids[i % len(ids)] for i in range(len(seeds))]


def _label_id(v, spec) -> int:
    if isinstance(v, str) and v in spec.class_names:
        return spec.class_names.index(v)
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise DiffxError(f"label={v!r}: expected 'random', a class index or a class name such as "
                         f"{spec.class_names[0]!r}") from None
    if not 0 <= i < spec.num_classes:
        raise DiffxError(f"label={i}: out of range, the checkpoint has {spec.num_classes} classes (0..{spec.num_classes - 1})")
    return i
