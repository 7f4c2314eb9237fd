"""``diffx sample uncertainty.enabled=true``: per image, the variance of the sample under the last-layer
posterior, a variance map PNG on one log colour scale shared by the run, ``uncertainty.jsonl`` with a
score per image, and ``uncertainty.filter`` dropping the most uncertain fraction of each set.

``uncertainty.method=laplace`` propagates the closed form through the sampler
(``diffx.uncertainty.propagate``: one pass); ``method=mc`` is the reference, ``uncertainty.samples``
whole runs with one posterior draw each (``diffx.uncertainty.mc``). The variance is of ``x0`` in the
model's space: pixels in [-1, 1] (for a latent model, the latent's pixels).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffx import noise
from diffx.atomic import atomic_write
from diffx.errors import DiffxError
from diffx.generate import Request, denoiser, start_noise
from diffx.images import grid, save_png, to_uint8
from diffx.uncertainty import laplace, mc, propagate
from diffx.vae import sha256

METHODS = ("laplace", "mc")


def load_posterior(options, ckpt, parts) -> laplace.Posterior:
    """The sidecar named by ``uncertainty.laplace`` (default: beside the checkpoint), checked against
    the model file; the options checked too."""
    if options.method not in METHODS:
        raise DiffxError(f"uncertainty.method={options.method}: expected one of {', '.join(METHODS)}")
    if not 0 <= float(options.filter) < 1:
        raise DiffxError(f"uncertainty.filter={options.filter}: expected a fraction in [0, 1)")
    if options.method == "mc" and int(options.samples) < 2:
        raise DiffxError(f"uncertainty.samples={options.samples}: a variance needs at least 2 draws")
    head = laplace.head_of(parts.model, f"ckpt={ckpt}")
    path = options.laplace or Path(ckpt).parent / "laplace.safetensors"
    return laplace.load(path, sha256(ckpt), ckpt, head)


def generate(options, posterior: laplace.Posterior, parts, plan, request: Request, batch_size: int,
             device) -> tuple[np.ndarray, int, Tensor]:
    """``diffx.generate.generate`` with the variance: images (N, H, W, C) uint8, NFE per batch, and the
    per-pixel variance of x0 (N, C, H, W), float32 on the CPU."""
    if request.start is not None or request.others is not None:
        raise DiffxError("uncertainty.enabled=true draws from noise only: not with init_image= or a mixture")
    if not plan.deterministic:
        raise DiffxError(f"sampler={plan.name} draws fresh noise every step; uncertainty needs a deterministic "
                         "sampler (ddim, euler, dpmpp, ...)")
    posterior = posterior.to(device)
    condition, schedule = parts.condition, parts.objective.schedule
    seed = torch.Generator(posterior.cov.device).manual_seed(int(options.seed))
    probe = posterior.sample(1, parts.model.head.weight.shape[0], seed)[0]  # propagate's item 2
    images, variances, nfe = [], [], 0
    for lo in range(0, len(request.seeds), batch_size):
        rows = slice(lo, lo + batch_size)
        z = start_noise(parts, noise.generators(request.seeds[rows]), device)
        inputs = request.inputs[rows]
        negatives = None if request.negatives is None else request.negatives[rows]
        if options.method == "laplace":
            cond = condition.encode(inputs, device)
            uncond = condition.null(len(inputs), device) if negatives is None else condition.encode(negatives, device)
            denoise = propagate.TangentDenoiser(parts.model, parts.objective, cond, uncond, request.cfg,
                                                parts.latent.x0_range, probe=probe)
            with torch.no_grad():
                x0, var = propagate.moments(parts.model, posterior, propagate.run(plan, schedule, denoise, z),
                                            parts.latent.x0_range)
        else:
            denoise = denoiser(parts, inputs, negatives, request.cfg, device)
            with torch.no_grad():
                x0 = plan(denoise, schedule, z)
                _, var = mc.run_moments(parts, plan, inputs, negatives, request.cfg, z, posterior, int(options.samples),
                                        generator=torch.Generator(posterior.cov.device).manual_seed(int(options.seed)))
        images.append(to_uint8(parts.latent.decode(x0)))
        variances.append(var.float().cpu())
        nfe = denoise.nfe
    return np.concatenate(images), nfe, torch.cat(variances)


def scores(variance: Tensor) -> Tensor:
    """Per image (N,): the mean per-pixel variance."""
    return variance.flatten(1).mean(1)


def kept(score: Tensor, fraction: float) -> list[int]:
    """Indices of the images kept when the ``fraction`` with the highest scores is dropped, in order."""
    drop = int(round(fraction * len(score)))
    order = torch.argsort(score, descending=True, stable=True).tolist()
    return sorted(order[drop:])


# A perceptual, monotone colour map (the anchors of matplotlib's "inferno"), so no plotting library is needed.
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def colour(log_var: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(N, H, W) log10 variances -> (N, H, W, 3) uint8 on the scale [lo, hi]."""
    u = np.clip((log_var - lo) / max(hi - lo, 1e-12), 0, 1) * (len(_INFERNO) - 1)
    i = np.minimum(np.floor(u).astype(int), len(_INFERNO) - 2)
    frac = (u - i)[..., None]
    return np.round(_INFERNO[i] * (1 - frac) + _INFERNO[i + 1] * frac).astype(np.uint8)


def report(options, out: Path, set_names: list[str], seeds: list[int], images: np.ndarray, variance: Tensor,
           text: dict) -> list[list[int]]:
    """Write per image its variance map ``<set>/uncertainty/seedNNNNNN.png`` (channels averaged, log10,
    on one scale for the whole run), per set ``uncertainty_grid.png`` (each image beside its map), and
    ``<out>/uncertainty.jsonl``; returns per set the indices of the images kept by the filter."""
    n = len(seeds)
    score = scores(variance)
    per_pixel = variance.double().mean(1)  # (N, H, W)
    positive = per_pixel[per_pixel > 0]  # a pixel clipped at the last step has none: the scale's bottom
    lo, hi = (float(torch.log10(positive.min())), float(torch.log10(positive.max()))) if len(positive) else (0.0, 1.0)
    log_var = torch.log10(per_pixel.clamp(min=10**lo)).numpy()
    maps = colour(log_var, lo, hi)
    size = maps.shape[1]
    if images.shape[1] != size:  # a latent model: the map at the latent's resolution, shown at the image's
        factor = images.shape[1] // size
        maps = maps.repeat(factor, 1).repeat(factor, 2)
    lines, keep = [], []
    for k, name in enumerate(set_names):
        folder, rows = out / name, slice(k * n, (k + 1) * n)
        chosen = kept(score[rows], float(options.filter))
        keep.append(chosen)
        for i, seed in enumerate(seeds):
            j = k * n + i
            path = folder / "uncertainty" / f"seed{seed:06d}.png"
            save_png(path, maps[j], {**text, "seed": seed, "score": f"{float(score[j]):.6g}",
                                     "log10_var_min": f"{lo:.4f}", "log10_var_max": f"{hi:.4f}"})
            lines.append({"set": name, "seed": seed, "score": float(score[j]), "max": float(variance[j].max()),
                          "kept": i in chosen, "map": str(path), "method": options.method})
        pairs = np.concatenate([images[rows], maps[rows]], axis=2)  # (n, H, 2W, 3): image | map
        save_png(folder / "uncertainty_grid.png", grid(pairs, upscale=max(1, 128 // images.shape[1])),
                 {"log10_var_min": f"{lo:.4f}", "log10_var_max": f"{hi:.4f}"})
    body = "".join(json.dumps(line) + "\n" for line in lines)
    atomic_write(out / "uncertainty.jsonl", lambda tmp: Path(tmp).write_text(body))
    return keep


def spread(score: Tensor) -> str:
    """A one-line summary of the scores: their range over the run."""
    s = score.double()
    return f"mean per-pixel variance {float(s.min()):.3g} .. {float(s.max()):.3g} (median {float(s.median()):.3g})" \
        if len(s) and math.isfinite(float(s.max())) else "no images"
