"""Broken shapes, the kind a half-trained model draws, for checking that the reader refuses them.

``diffx.shapes.read`` must say "no match" (shape None) for a blob that is no shape of the data, and
``diffx.shapes.examine`` must count a second object. Each fault here starts from a clean render's
coverage and breaks it in one way; pixel noise can then be added as generated images carry it.
Used by tests/test_shapes.py and scripts/bench_reader.py.
"""

from __future__ import annotations

import numpy as np

from diffx import shapes as rules

FAULTS = ("bite", "half", "stretched", "ring", "two")


def _colour(alpha: np.ndarray, color: str) -> np.ndarray:
    bg, fg = np.array(rules.BACKGROUND, float), np.array(rules.PALETTE[color], float)
    return bg + np.clip(alpha, 0, 1)[..., None] * (fg - bg)  # (S, S, 3) float


def broken(fault: str, attrs: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S, 3) float pixels of ``attrs`` broken by ``fault``:

    - ``bite``: a quarter of the shape removed (a C-shaped blob for a circle), in a random quadrant;
    - ``half``: only the lower half drawn (a half-drawn triangle is a trapezoid);
    - ``stretched``: the shape stretched to 1.8x its width (an ellipse for a circle);
    - ``ring``: the shape hollow, its inner 60% (in half-width) missing;
    - ``two``: a second shape of the same colour in the opposite corner (an extra object).
    """
    s = size
    r = rules.SIZES[attrs["size"]] * s
    cx, cy = (np.array(rules.POSITIONS[attrs["position"]]) + rng.uniform(-rules.JITTER, rules.JITTER, 2)) * s
    alpha = rules.coverage(attrs["shape"], r, cx, cy, s)
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    if fault == "bite":
        sx, sy = rng.choice([-1, 1], 2)
        sy = 1 if attrs["shape"] == "triangle" else sy  # a triangle's mass is low: bite a lower quarter
        alpha = np.where((sx * (xx - cx) > 0) & (sy * (yy - cy) > 0), 0.0, alpha)
    elif fault == "half":
        alpha = np.where(yy < cy, 0.0, alpha)
    elif fault == "stretched":
        k = rules.SUPERSAMPLE
        grid = (np.arange(s * k) + 0.5) / k
        inside = rules._INSIDE[attrs["shape"]]((grid[None, :] - cx) / (1.8 * r), (grid[:, None] - cy) / r)
        alpha = inside.reshape(s, k, s, k).mean(axis=(1, 3))
    elif fault == "ring":
        alpha = alpha - rules.coverage(attrs["shape"], 0.6 * r, cx, cy, s)
    elif fault == "two":
        far = max(rules.POSITIONS.values(), key=lambda p: (p[0] * s - cx) ** 2 + (p[1] * s - cy) ** 2)
        ox, oy = far[0] * s, far[1] * s  # the anchor farthest from the first: never on top of it
        alpha = np.clip(alpha + rules.coverage(attrs["shape"], r, ox, oy, s), 0, 1)
    else:
        raise ValueError(f"fault {fault!r}: expected one of {FAULTS}")
    return _colour(alpha, attrs["color"])


def noisy(pixels: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 pixels with i.i.d. Gaussian noise of ``sigma`` grey levels added, then rounded and clipped."""
    return np.clip(np.rint(np.asarray(pixels, float) + sigma * rng.standard_normal(pixels.shape)), 0, 255).astype(np.uint8)
