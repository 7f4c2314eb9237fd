"""``diffx eval``: how well a checkpoint trained on ``data=shapes`` draws what it is told.

For each guidance scale, one image per held-out caption (a fixed seeded subset of the shapes
attribute grid, the same for every checkpoint of the same data) is generated and read back with
``diffx.shapes.read`` -- the render rules run backwards, no learned judge -- and scored per
attribute and by exact match. A text checkpoint is told all four attributes and scored on all
four; a label checkpoint is told only its class (shape and colour), so only those are scored.
Results go to a rich table and to ``eval.json`` beside the checkpoint (or in ``out=``).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.table import Table

from diffx import checkpoint
from diffx import shapes as shape_rules
from diffx.atomic import atomic_write
from diffx.errors import DiffxError
from diffx.images import grid, save_png
from diffx.generate import Request, generate, resolve_device, sampling_plan

ATTRIBUTES = ("shape", "color", "size", "position")


def evaluate(cfg: DictConfig) -> dict:
    """Generate, read back and score; returns the report that is also written as JSON."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx eval ckpt=runs/<run>/model.safetensors")
    device = resolve_device(cfg.device)
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    shapes, colors = _vocabulary(ckpt.parts.get("data", {}), cfg.ckpt)
    targets = held_out(shapes, colors, cfg.captions, cfg.seed)
    attributes, inputs = _requests(parts.condition, targets)
    seeds = [cfg.seed + i for i in range(len(targets))]
    scales = [float(s) for s in cfg.cfg] if isinstance(cfg.cfg, (list, ListConfig)) else [float(cfg.cfg)]
    plan = sampling_plan(cfg, parts.objective.schedule)

    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent
    outputs = [out / "eval.json"] + ([out / f"eval_cfg{s:g}.png" for s in scales] if cfg.save_grid else [])
    clash = [p for p in outputs if p.exists()]
    if clash and not cfg.overwrite:
        raise DiffxError(f"{clash[0]} already exists; choose another out= or pass overwrite=true")
    rows = []
    for scale in scales:
        images, _ = generate(parts, plan, Request(seeds, inputs, None, scale), cfg.batch_size, device)
        rows.append({"cfg": scale, **score(images, targets, attributes, shapes, colors)})
        if cfg.save_grid:
            save_png(out / f"eval_cfg{scale:g}.png", grid(images, upscale=max(1, 64 // ckpt.spec.image_size)))
    report = {
        "ckpt": str(cfg.ckpt), "step": ckpt.step, "sampler": plan.name,
        "steps": plan.steps, "seed": cfg.seed, "attributes": list(attributes),
        "prompts": [shape_rules.caption(t) for t in targets], "results": rows,
    }
    path = out / "eval.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    Console().print(_table(report), f"\nwrote {path}")
    return report


def held_out(shapes, colors, n: int, seed: int = 0) -> list[dict]:
    """``n`` attribute sets drawn without replacement from the full grid (shape x colour x size x
    position), by ``seed``: a fixed evaluation set, in a stable order."""
    grid_ = [dict(zip(ATTRIBUTES, combo)) for combo in itertools.product(
        shapes, colors, shape_rules.SIZES, shape_rules.POSITIONS)]
    if n < 1:
        raise DiffxError(f"captions={n}: expected at least 1")
    return random.Random(seed).sample(grid_, min(n, len(grid_)))


def score(images: np.ndarray, targets: list[dict], attributes=ATTRIBUTES, shapes=shape_rules.SHAPES,
          colors=shape_rules.COLORS) -> dict:
    """Read each (H, W, 3) uint8 image back and compare it with its target attributes: the fraction
    right per attribute, and the fraction with every scored attribute right (exact match)."""
    reads = [shape_rules.read(img, shapes, colors) for img in images]
    right = np.array([[r[a] == t[a] for a in attributes] for r, t in zip(reads, targets)])  # (N, A)
    return {
        "n": len(targets),
        "accuracy": {a: float(right[:, k].mean()) for k, a in enumerate(attributes)},
        "exact": float(right.all(axis=1).mean()),
        "reads": reads,
    }


def _vocabulary(data: dict, ckpt) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The shapes and colours the checkpoint's data drew from: the only candidates when reading."""
    if data.get("_target_") != "diffx.data.shapes":
        raise DiffxError(f"{ckpt} was trained on {data.get('_target_')!r}; diffx eval scores models trained on "
                         "data=shapes only (it reads the shapes back from the pixels)")
    return shape_rules.check(data.get("shapes", shape_rules.SHAPES), data.get("colors", shape_rules.COLORS))


# What a condition source can be told of a shapes image (``Source.tells``) -> the attributes scored.
_SCORED = {"caption": ATTRIBUTES, "class": ("shape", "color")}


def _requests(condition, targets: list[dict]) -> tuple[tuple[str, ...], list]:
    """What the model is told per target, and so which attributes are scored: a caption tells all
    four, a class label (a colour and a shape) two."""
    inputs = [condition.input_for(shape_rules.caption(t), f"{t['color']} {t['shape']}") for t in targets]
    return _SCORED[condition.tells], inputs


def _table(report: dict) -> Table:
    attributes = report["attributes"]
    table = Table(title=f"prompt adherence: {Path(report['ckpt']).name}, step {report['step']}, "
                        f"{report['sampler']} {report['steps']} steps, {report['results'][0]['n']} prompts")
    for column in ("cfg", *attributes, "exact match"):
        table.add_column(column, justify="right")
    for row in report["results"]:
        table.add_row(f"{row['cfg']:g}", *(f"{100 * row['accuracy'][a]:.1f}%" for a in attributes),
                      f"{100 * row['exact']:.1f}%")
    return table
