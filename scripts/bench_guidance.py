"""Guidance at the scales SD users run (cfg 1-15): exact match and saturation, plain CFG vs CFG rescale
(Lin et al. 2024) vs a guidance interval (Kynkaanniemi et al. 2024), on a text checkpoint of data=shapes.

    python scripts/bench_guidance.py runs/<run>/model.safetensors [--n 128] [--steps 30]

Each row draws the same prompts and seeds (``diffx eval``'s seen/all split, template prompts) and
reads them back (``diffx.shapes.examine``). "clipped" is the share of pixel values at 0 or 255, the
over-saturation that large scales cause (the shapes' own colours stay within 20..250); "off-colour"
is the RMS distance (grey levels) of the shape's pixels from the line between the background and the
colour read, i.e. colour shifts that the reader's colour choice alone does not show.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffx import captions, checkpoint, holdout
from diffx import shapes as S
from diffx.evaluate import _requests, draw, score
from diffx.generate import Request, generate
from diffx import grids
from diffx.samplers import plan as plans
from diffx.samplers.multistep import dpmpp

VARIANTS = {"plain CFG": {}, "rescale 0.7": {"rescale": 0.7}, "interval [0.2, 0.85]": {"interval": (0.2, 0.85)},
            "both": {"rescale": 0.7, "interval": (0.2, 0.85)}}


def off_colour(images: np.ndarray, reads: list[dict]) -> float:
    """RMS distance of the shape pixels (coverage >= 0.5) from the background -> read colour line."""
    errors = []
    for img, r in zip(images, reads):
        if r["color"] is None:
            continue
        v = img.astype(float) - np.array(S.BACKGROUND, float)
        u = np.array(S.PALETTE[r["color"]], float) - np.array(S.BACKGROUND, float)
        a = v @ u / (u @ u)
        inside = a >= 0.5
        errors.append(((v - np.clip(a, 0, 1)[..., None] * u)[inside] ** 2).sum(-1))
    return float(np.sqrt(np.concatenate(errors).mean())) if errors else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0, 7.5, 15.0])
    args = parser.parse_args()
    parts, ckpt = checkpoint.load(args.ckpt, "cpu")
    data = ckpt.parts["data"]
    shapes, colors = S.check(data.get("shapes", S.SHAPES), data.get("colors", S.COLORS))
    split = "seen" if holdout.held_out(data.get("holdout"), shapes, colors, int(data.get("seed", 0))) else "all"
    targets = draw(holdout.split(split, data.get("holdout"), shapes, colors, int(data.get("seed", 0))), args.n, 0)
    attributes, inputs = _requests(parts.condition, targets, captions.captions(targets, "template", 0))
    schedule = parts.objective.schedule
    plan = plans.make(dpmpp, grids.uniform, args.steps, schedule)
    print(f"{args.ckpt}: {len(targets)} {split} prompts, dpmpp {args.steps} steps")
    print("| cfg | guidance | exact match | malformed | clipped pixels | off-colour (RMS) |\n|---|---|---|---|---|---|")
    for scale in args.cfg:
        for name, options in VARIANTS.items():
            if scale == 1.0 and options:
                continue  # no guidance to modify
            torch.manual_seed(0)
            images, _ = generate(parts, plan, Request(list(range(len(targets))), inputs, None, scale, **options), 64, "cpu")
            result = score(images, targets, attributes, shapes, colors)
            clipped = float(((images == 0) | (images == 255)).mean())
            print(f"| {scale:g} | {name} | {100 * result['exact']:.1f}% | {100 * result['malformed']:.1f}% | "
                  f"{100 * clipped:.2f}% | {off_colour(images, result['reads']):.1f} |", flush=True)


if __name__ == "__main__":
    main()
