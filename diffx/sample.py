"""``diffx sample``: checkpoint -> rebuild the parts -> sampler -> decode -> PNG files and a grid.

Image i uses seed ``seed + i`` for its start noise and its label, so it is the same whatever the
batch size. The sampler and its grid are chosen now, not at training time. A text-conditioned
checkpoint draws one image set per prompt (``prompt=``, a string or a list, and/or
``prompt_file=``, one prompt per line), each in its own folder, all with the same seeds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from rich.console import Console

from diffx import checkpoint, conditioning, noise
from diffx.build import Parts
from diffx.errors import DiffxError
from diffx.images import grid, save_png, to_uint8
from diffx.learned import LinearSolver
from diffx.samplers import make_denoiser


@dataclass
class ImageSet:
    """One folder of images: per image, the condition source's input (a label, a prompt, or None
    when unconditional), the negative input (None: the null condition), and its PNG text."""

    folder: Path
    inputs: list
    negatives: list | None
    info: list[dict]


def sample(cfg: DictConfig) -> list[Path]:
    """Generate ``cfg.n`` images per set from ``cfg.ckpt``; returns the PNG paths, each set's grid
    after its images."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx sample ckpt=runs/<run>/model.safetensors")
    device = resolve_device(cfg.device)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    spec, schedule = ckpt.spec, parts.objective.schedule
    check_guidance(cfg, parts)

    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "samples"
    seeds = [cfg.seed + i for i in range(cfg.n)]
    sets = _image_sets(cfg, parts.condition, spec, out, seeds)
    names = [f"seed{s:06d}.png" for s in seeds] + [f"grid_seed{seeds[0]:06d}-{seeds[-1]:06d}.png"]
    files = [s.folder / name for s in sets for name in names]
    clash = [f for f in files if f.exists()]
    if clash and not cfg.overwrite:
        raise DiffxError(f"{clash[0]} already exists ({len(clash)} of the outputs do); "
                         "choose another out= or seed=, or pass overwrite=true")

    sampler, ts, steps, sampler_name = sampler_and_grid(cfg, schedule)
    for image_set in sets:
        images, nfe = generate(parts, spec, sampler, ts, seeds, image_set.inputs, image_set.negatives,
                               cfg.cfg, cfg.batch_size, device)
        image_set.folder.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds):
            text = {"seed": seed, "sampler": sampler_name, "steps": steps, "nfe": nfe, "cfg": cfg.cfg,
                    "ckpt": str(cfg.ckpt), "step": ckpt.step, **image_set.info[i]}
            save_png(image_set.folder / names[i], images[i], text)
        save_png(image_set.folder / names[-1], grid(images, upscale=max(1, 128 // spec.image_size)))
        Console().print(f"wrote {cfg.n} images ({sampler_name}, {steps} steps, {nfe} NFE per batch, "
                        f"cfg={cfg.cfg}) to {image_set.folder}\ngrid: {image_set.folder / names[-1]}")
    return files


def check_guidance(cfg: DictConfig, parts: Parts) -> None:
    """Guidance (``cfg != 1``) needs a conditional checkpoint."""
    if cfg.cfg != 1.0 and type(parts.condition) is conditioning.Unconditional:
        raise DiffxError(f"cfg={cfg.cfg} needs a conditional model, but {cfg.ckpt} is unconditional; use cfg=1")


def sampler_and_grid(cfg: DictConfig, schedule) -> tuple:
    """``(sampler, ts, steps, name)``: a fitted solver (``sampler=learned``) brings its own grid and
    step count; any other sampler runs ``cfg.steps`` steps of ``cfg.grid``."""
    sampler = instantiate(cfg.sampler)
    if isinstance(sampler, LinearSolver):
        fitted_cfg = sampler.meta.get("cfg")
        if fitted_cfg is not None and isinstance(cfg.get("cfg"), (int, float)) and float(fitted_cfg) != cfg.cfg:
            Console().print(f"note: {cfg.sampler.path} was fitted at cfg={fitted_cfg}, sampling at cfg={cfg.cfg}")
        return sampler, sampler.ts, sampler.steps, f"learned({sampler.meta.get('base', '?')})"
    return sampler, instantiate(cfg.grid)(cfg.steps, schedule), cfg.steps, cfg.sampler._target_.rsplit(".", 1)[-1]


def condition_inputs(cfg: DictConfig, condition, spec, seeds: list[int]) -> list:
    """One condition input per seed for a fit or a score: the prompts cycled (text), ``label=``
    (classes) or None (unconditional)."""
    if isinstance(condition, conditioning.Text):
        prompts = _required_prompts(cfg)
        return [prompts[i % len(prompts)] for i in range(len(seeds))]
    labels = _labels(cfg.label, seeds, spec)
    return [None] * len(seeds) if labels is None else labels


def resolve_device(device: str) -> torch.device:
    return torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def generate(parts: Parts, spec, sampler, ts, seeds: list[int], inputs: list, negatives: list | None,
             cfg_scale: float, batch_size: int, device) -> tuple[np.ndarray, int]:
    """Images (N, H, W, C) uint8 for per-image seeds and condition inputs, and the NFE per batch.

    ``inputs[i]`` is what the checkpoint's condition source encodes (a label, a prompt, None);
    ``negatives[i]`` is the guidance's unconditional input, or None for the null condition.
    """
    c = parts.latent.channels(spec.channels)
    size = spec.image_size // parts.latent.factor
    condition, images, nfe = parts.condition, [], 0
    for lo in range(0, len(seeds), batch_size):
        chunk = seeds[lo: lo + batch_size]
        gens = noise.generators(chunk)
        x = noise.randn((len(chunk), c, size, size), gens, device)
        cond = condition.encode(inputs[lo: lo + len(chunk)], device)
        uncond = (condition.null(len(chunk), device) if negatives is None
                  else condition.encode(negatives[lo: lo + len(chunk)], device))
        denoise = make_denoiser(parts.model, parts.objective, cond, uncond, cfg_scale=cfg_scale,
                                x0_range=parts.latent.x0_range)
        x0 = sampler(denoise, parts.objective.schedule, x, ts, generator=gens)
        images.append(to_uint8(parts.latent.decode(x0)))
        nfe = denoise.nfe
    return np.concatenate(images), nfe


def _image_sets(cfg: DictConfig, condition, spec, out: Path, seeds: list[int]) -> list[ImageSet]:
    """What to draw: one set per prompt for a text checkpoint, else one set of labels (or none)."""
    n, prompts, negative = len(seeds), _prompts(cfg), cfg.get("negative_prompt") or ""
    if isinstance(condition, conditioning.Text):
        prompts = _required_prompts(cfg)
        return [ImageSet(out / f"{k:02d}-{_slug(p)}", [p] * n, [negative] * n,
                         [{"prompt": p, "negative_prompt": negative}] * n) for k, p in enumerate(prompts)]
    if prompts or negative:
        raise DiffxError(f"prompt=/prompt_file=/negative_prompt= need a text-conditioned checkpoint (trained with "
                         f"text_encoder=...); {cfg.ckpt} takes label=")
    labels = _labels(cfg.label, seeds, spec)
    if labels is None:
        return [ImageSet(out, [None] * n, None, [{}] * n)]
    return [ImageSet(out, labels, None, [{"label": v, "class_name": spec.class_names[v]} for v in labels])]


def _prompts(cfg: DictConfig) -> list[str]:
    """``prompt`` (a string or a list), then the non-blank lines of ``prompt_file``."""
    prompt = cfg.get("prompt")
    prompts = [] if prompt is None else [str(p) for p in prompt] if isinstance(prompt, (list, ListConfig)) else [str(prompt)]
    if cfg.get("prompt_file"):
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise DiffxError(f"prompt_file={path}: no such file (expected one prompt per line)")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def _required_prompts(cfg: DictConfig) -> list[str]:
    prompts = _prompts(cfg)
    if not prompts:
        raise DiffxError(f"{cfg.ckpt} is text-conditioned: pass prompt=\"...\" (or a list, or prompt_file=PATH)")
    return prompts


def _slug(prompt: str) -> str:
    """A folder-name-safe short form of a prompt: 'a red circle!' -> 'a-red-circle'."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"


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
