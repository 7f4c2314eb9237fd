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

from diffx import checkpoint
from diffx.errors import DiffxError
from diffx.generate import Request, check_guidance, generate, image_start, resolve_device, sampling_plan
from diffx.images import grid, save_png


def sample(cfg: DictConfig) -> list[Path]:
    """Generate ``cfg.n`` images per set from ``cfg.ckpt``; returns the PNG paths, each set's grid
    after its images."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx sample ckpt=runs/<run>/model.safetensors")
    device = resolve_device(cfg.device)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
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

    plan = sampling_plan(cfg, parts.objective.schedule)
    if plan.note:
        console.print(f"note: {plan.note}")
    start, start_text = None, {}
    if cfg.init_image:
        start = image_start(parts, cfg.init_image, cfg.strength, cfg.mask, cfg.resample, device)
        start_text = {"init_image": cfg.init_image, "strength": start.strength,
                   **({"mask": cfg.mask, "resample": cfg.resample} if cfg.mask else {})}
    for image_set in sets:
        folder = out / image_set.name
        request = Request(seeds, image_set.inputs, image_set.negatives, cfg.cfg, start=start)
        images, nfe = generate(parts, plan, request, cfg.batch_size, device)
        folder.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds):
            text = {"seed": seed, "sampler": plan.name, "steps": plan.steps, "nfe": nfe, "cfg": cfg.cfg,
                    "ckpt": str(cfg.ckpt), "step": ckpt.step, **start_text, **image_set.info[i]}
            save_png(folder / names[i], images[i], text)
        save_png(folder / names[-1], grid(images, upscale=max(1, 128 // ckpt.spec.image_size)))
        console.print(f"wrote {cfg.n} images ({plan.name}, {plan.steps} steps, {nfe} NFE per batch, "
                      f"cfg={cfg.cfg}) to {folder}\ngrid: {folder / names[-1]}")
    return files
