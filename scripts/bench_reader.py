"""How far the shapes reader can be trusted: accuracy on noisy renders, and broken shapes caught.

    python scripts/bench_reader.py            # ~1 min on one CPU core

1. Every attribute set of the default vocabulary (324), each with a random jitter, at 16 and 32
   pixels, with Gaussian pixel noise of sigma 0, 4, 8, 12 grey levels: the share read exactly right.
2. Broken shapes (diffx/malformed.py: a quarter bitten off, half drawn, stretched, hollow, a second
   object) at the same sizes and noise: the share the reader refuses (shape None, or objects != 1),
   i.e. the share ``diffx eval`` does not count as a correct image.
"""

from __future__ import annotations

import argparse

import numpy as np

from diffx import holdout, malformed
from diffx import shapes as S


def accuracy(size: int, sigma: float, seed: int = 0) -> float:
    rng, right, grid = np.random.default_rng(seed), 0, holdout.combinations(S.SHAPES, S.COLORS)
    for attrs in grid:
        img = malformed.noisy(S.render(attrs, size, rng.uniform(-S.JITTER, S.JITTER, 2)), sigma, rng)
        found = S.examine(img)
        right += all(found[k] == attrs[k] for k in holdout.ATTRIBUTES) and found["objects"] == 1
    return right / len(grid)


def caught(fault: str, size: int, sigma: float, seed: int = 0) -> float:
    rng, hits, grid = np.random.default_rng(seed), 0, holdout.combinations(S.SHAPES, S.COLORS)
    for attrs in grid:
        found = S.examine(malformed.noisy(malformed.broken(fault, attrs, size, rng), sigma, rng))
        hits += found["shape"] is None or found["objects"] != 1
    return hits / len(grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0, 4, 8, 12])
    args = parser.parse_args()
    print("| size | noise sigma | clean renders read right | " + " | ".join(f"{f} caught" for f in malformed.FAULTS) + " |")
    print("|---|---|---|" + "---|" * len(malformed.FAULTS))
    for size in args.sizes:
        for sigma in args.sigmas:
            cells = [f"{100 * caught(f, size, sigma):.1f}%" for f in malformed.FAULTS]
            print(f"| {size} | {sigma:g} | {100 * accuracy(size, sigma):.1f}% | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
