"""What a training run shows of itself beside its loss log: sample grids from the EMA weights while it
trains (``train.sample_every``), and at the end its loss on a fixed probe batch (``metrics.json``, the
number a sweeper minimises) and its loss curve (``loss.png``).

The probe is not a held-out set: the data has no split. It is a fixed set of training images, each
with a fixed seeded noise and time, the same in every run on the same data whatever its ``seed``,
``train.batch_size`` or length, so the jobs of a sweep are compared on the same (x0, noise, t) triples
(a paired comparison, much less noisy than two random batches). Its loss is the EMA model's, the
weights that are sampled from, at the objective's own training weighting and t distribution.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from diffx import grids, plots
from diffx.atomic import atomic_write
from diffx.build import Parts
from diffx.generate import Request, generate
from diffx.images import grid, save_png
from diffx.samplers import multistep
from diffx.samplers import plan as plans

PROBE_IMAGES = 64    # training images in the probe batch (fewer if the data has fewer)
PROBE_CHUNK = 16     # images per forward pass, each chunk with its own seeded generator: fixed here, not
                     # train.batch_size, so that the probe's draws do not depend on the run's batching
PROBE_SEED = 0       # picks the images and seeds their (t, noise) draws
PREVIEW_IMAGES = 16  # one 4x4 grid: seeds 0..15, every class in turn or 16 of the data's captions
PREVIEW_STEPS = 20   # DPM-Solver++(2M), deterministic: a grid changes only when the weights do


@torch.no_grad()
def probe_loss(model, objective, condition, dataset, to_x0, device) -> float:
    """The mean loss of ``model`` on the probe batch: the first ``PROBE_IMAGES`` of a fixed seeded
    permutation of ``dataset``, conditioned on their own labels or captions (no condition dropout)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(PROBE_SEED))
    picks = order[:PROBE_IMAGES].tolist()
    total = 0.0
    for k, lo in enumerate(range(0, len(picks), PROBE_CHUNK)):
        batch = torch.utils.data.default_collate([dataset[i] for i in picks[lo: lo + PROBE_CHUNK]])
        x0 = to_x0(batch["x"].to(device))
        generator = torch.Generator(device=device).manual_seed(PROBE_SEED + k)  # draws t, then the noise
        total += float(objective.loss(model, x0, condition(batch, device), generator=generator).sum())
    return total / len(picks)


def preview_inputs(condition, captions: list[str]) -> list:
    """One condition input per preview image, by what the condition source can be told: every class
    in turn, or distinct captions of the data (a fixed seeded pick), or nothing."""
    distinct = sorted(set(captions))
    picked = random.Random(PROBE_SEED).sample(distinct, min(PREVIEW_IMAGES, len(distinct)))
    options = {"class": {"label": "all"}, "caption": {"prompt": picked}}.get(condition.tells, {})
    return condition.inputs(options, list(range(PREVIEW_IMAGES)))


@torch.no_grad()
def save_preview(path: Path, parts: Parts, ema_model, inputs: list, step: int, device) -> None:
    """A grid of ``inputs`` drawn from the EMA weights through the generation layer: seeds 0..n-1,
    ``PREVIEW_STEPS`` DPM-Solver++ steps, no guidance; settings in the PNG's text chunks."""
    plan = plans.make(multistep.dpmpp, grids.uniform, PREVIEW_STEPS, parts.objective.schedule)
    seeds = list(range(len(inputs)))
    images, _ = generate(replace(parts, model=ema_model), plan, Request(seeds, inputs), len(seeds), device)
    mosaic = grid(images, upscale=max(1, 128 // parts.spec.image_size))
    save_png(path, mosaic, {"step": step, "sampler": plan.name, "steps": plan.steps, "cfg": 1.0,
                            "seeds": f"0-{len(seeds) - 1}", "inputs": json.dumps(inputs)})


def write_results(run_dir: Path, metrics: dict) -> None:
    """``metrics.json`` (with the last logged training loss added) and ``loss.png``, the curve of
    ``log.jsonl``."""
    curve = plots.loss_series(plots.read_log(run_dir / "log.jsonl"))
    metrics = {**metrics, "final_loss": curve[-1][1] if curve else None}
    atomic_write(run_dir / plots.METRICS, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1) + "\n"))
    plots.save_curves(run_dir / "loss.png", {"loss": curve}, f"training loss, {run_dir.name}")
