"""``diffx sample``: checkpoint -> a sampling plan -> images (diffx.generate) -> PNG files and a grid.

Image i uses seed ``seed + i`` for its start noise and its label, so it is the same whatever the
batch size. The sampler and its grid are chosen now, not at training time. A text-conditioned
checkpoint draws one image set per prompt (``prompt=``, a string or a list, and/or
``prompt_file=``, one prompt per line), each in its own folder, all with the same seeds.

``init_image=`` starts every image from that picture noised to ``strength`` (img2img, SDEdit), and
``mask=`` with it redraws only the mask's white part (inpainting, RePaint); ``diffx.generate.image_start``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from diffx import checkpoint, precision
from diffx.errors import DiffxError
from diffx.generate import (Request, check_guidance, generate, guidance_options, image_start, resolve_device,
                            sampling_plan)
from diffx.images import grid, save_png
from diffx.uncertainty import sampling as uncertain


def sample(cfg: DictConfig) -> list[Path]:
    """Generate ``cfg.n`` images per set from ``cfg.ckpt``; returns the PNG paths, each set's grid
    after its images."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx sample ckpt=runs/<run>/model.safetensors")
    device = resolve_device(cfg.device)
    precision.check(cfg.precision)
    if cfg.uncertainty.enabled and cfg.precision != "fp32":
        raise DiffxError(f"precision={cfg.precision} with uncertainty.enabled=true: the variance propagation runs in "
                         "float32; use precision=fp32")
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    parts = precision.apply(parts, cfg.precision, device)
    check_guidance(cfg.cfg, parts, cfg.ckpt)
    console = Console()

    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "samples"
    seeds = [cfg.seed + i for i in range(cfg.n)]
    sets = parts.condition.image_sets(cfg, seeds)
    names = [f"seed{s:06d}.png" for s in seeds] + [f"grid_seed{seeds[0]:06d}-{seeds[-1]:06d}.png"]
    files = [out / s.name / name for s in sets for name in names]
    clash = [f for f in files if f.exists()]
    if clash and not cfg.overwrite:
        raise DiffxError(f"{clash[0]} already exists ({len(clash)} of the outputs do); "
                         "choose another out= or seed=, or pass overwrite=true")

    for line in parts.condition.notes([s.inputs[0] for s in sets], ckpt.spec.vocabulary):
        console.print(f"warning: {line}", soft_wrap=True, markup=False)
    plan = sampling_plan(cfg, parts.objective.schedule, ckpt.sampling)
    if plan.note:
        console.print(f"note: {plan.note}")
    start, start_text = None, {}
    if cfg.init_image:
        start = image_start(parts, cfg.init_image, cfg.strength, cfg.mask, cfg.resample, device)
        start_text = {"init_image": cfg.init_image, "strength": start.strength,
                   **({"mask": cfg.mask, "resample": cfg.resample} if cfg.mask else {})}
    # Every set in one request, so a prompt file is drawn in batches across its prompts; image i of
    # each set keeps seed + i (diffx.generate: one generator per image), so batching changes nothing.
    request = Request(seeds * len(sets), [x for s in sets for x in s.inputs],
                      None if sets[0].negatives is None else [x for s in sets for x in s.negatives], cfg.cfg,
                      start=start, **guidance_options(cfg))
    kept = None
    if cfg.uncertainty.enabled:  # the variance of each image under the last layer's posterior (diffx.uncertainty)
        posterior = uncertain.load_posterior(cfg.uncertainty, cfg.ckpt, parts)
        everything, nfe, variance = uncertain.generate(cfg.uncertainty, posterior, parts, plan, request,
                                                       cfg.batch_size, device)
        kept = uncertain.report(cfg.uncertainty, out, [s.name for s in sets], seeds, everything, variance,
                                {"sampler": plan.name, "steps": plan.steps, "cfg": cfg.cfg, "ckpt": str(cfg.ckpt)})
        console.print(f"uncertainty ({cfg.uncertainty.method}): {uncertain.spread(uncertain.scores(variance))}; "
                      f"maps and {out / 'uncertainty.jsonl'}")
    else:
        everything, nfe = generate(parts, plan, request, cfg.batch_size, device)
    for k, image_set in enumerate(sets):
        folder, images = out / image_set.name, everything[k * cfg.n: (k + 1) * cfg.n]
        if kept is not None:  # uncertainty.filter dropped the most uncertain of this set
            images, seeds_k, info_k = images[kept[k]], [seeds[i] for i in kept[k]], [image_set.info[i] for i in kept[k]]
        else:
            seeds_k, info_k = seeds, image_set.info
        folder.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds_k):
            text = {"seed": seed, "sampler": plan.name, "steps": plan.steps, "nfe": nfe, "cfg": cfg.cfg,
                    "ckpt": str(cfg.ckpt), "step": ckpt.step, **start_text, **info_k[i]}
            save_png(folder / f"seed{seed:06d}.png", images[i], text)
        save_png(folder / names[-1], grid(images, upscale=max(1, 128 // ckpt.spec.image_size)))
        console.print(f"wrote {len(seeds_k)} images ({plan.name}, {plan.steps} steps, {nfe} NFE per batch, "
                      f"cfg={cfg.cfg}) to {folder}\ngrid: {folder / names[-1]}")
    return files
