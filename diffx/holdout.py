"""A compositional hold-out: attribute combinations of the shapes data that training never shows.

The shapes grid is shape x colour x size x position (324 combinations with the default vocabulary).
``data.holdout`` removes some combinations from training while every single attribute value stays
in it, so ``diffx eval split=heldout`` asks for things the model knows one by one but never saw
together: compositional generalisation, not recall. It is either

- a fraction in (0, 1): that share of the combinations, drawn by ``data.seed``; or
- a list of patterns, each naming one or more attribute values ("red circle", "large triangle at the
  top left", "blue"): every combination matching all the values a pattern names is held out.

The same function runs at training time (``diffx.data.shapes``) and at evaluation time (from the
checkpoint's stored data config), so the two always agree.
"""

from __future__ import annotations

import itertools
import random
import re

from diffx import shapes as rules
from diffx.errors import DiffxError

ATTRIBUTES = ("shape", "color", "size", "position")


def combinations(shapes, colors) -> list[dict]:
    """Every attribute set of the grid, in a stable order."""
    return [dict(zip(ATTRIBUTES, combo)) for combo in itertools.product(shapes, colors, rules.SIZES, rules.POSITIONS)]


def key(attrs: dict) -> tuple:
    return tuple(attrs[a] for a in ATTRIBUTES)


def held_out(holdout, shapes, colors, seed: int = 0) -> list[dict]:
    """The held-out combinations for ``data.holdout`` (None / 0 / [] -> none), in grid order."""
    grid = combinations(shapes, colors)
    if holdout is None or holdout == 0 or (isinstance(holdout, (list, tuple)) and not holdout):
        return []
    if isinstance(holdout, (int, float)) and not isinstance(holdout, bool):
        if not 0 < holdout < 1:
            raise DiffxError(f"data.holdout={holdout}: expected a fraction in (0, 1) or a list of patterns "
                             "such as ['red circle', 'large triangle']")
        n = max(1, round(holdout * len(grid)))
        chosen = set(random.Random(f"holdout-{seed}").sample(range(len(grid)), n))
        out = [a for i, a in enumerate(grid) if i in chosen]
    else:
        patterns = [pattern(str(p), shapes, colors) for p in holdout]
        out = [a for a in grid if any(all(a[k] == v for k, v in p.items()) for p in patterns)]
    if len(out) == len(grid):
        raise DiffxError(f"data.holdout={holdout}: holds out every combination; nothing would be left to train on")
    return out


def pattern(text: str, shapes, colors) -> dict:
    """'large red circle at the top left' -> the attribute values it names; an unknown word is an error."""
    values = {"shape": shapes, "color": colors, "size": tuple(rules.SIZES),
              "position": sorted(rules.POSITIONS, key=len, reverse=True)}  # "top left" before "top"
    rest, found = " " + " ".join(text.lower().split()) + " ", {}
    for attr, names in values.items():
        for name in names:
            if f" {name} " in rest:
                found[attr] = name
                rest = rest.replace(f" {name} ", " ", 1)
                break
    leftover = [w for w in re.findall(r"[a-z]+", rest) if w not in ("a", "an", "the", "at", "on", "in")]
    if leftover or not found:
        raise DiffxError(f"data.holdout pattern {text!r}: expected attribute values such as 'red circle' or "
                         f"'large triangle at the top left' (shapes {list(shapes)}, colors {list(colors)}, "
                         f"sizes {list(rules.SIZES)}, positions {list(rules.POSITIONS)})")
    return found


def split(split_name: str, holdout, shapes, colors, seed: int = 0) -> list[dict]:
    """The combinations of one evaluation split: ``heldout`` (never trained on), ``seen`` (trained on)
    or ``all`` (the whole grid)."""
    grid = combinations(shapes, colors)
    if split_name == "all":
        return grid
    out = {key(a) for a in held_out(holdout, shapes, colors, seed)}
    if split_name == "heldout":
        if not out:
            raise DiffxError("split=heldout: this checkpoint was trained without data.holdout, so no prompt is "
                             "held out; use split=all")
        return [a for a in grid if key(a) in out]
    if split_name == "seen":
        return [a for a in grid if key(a) not in out]
    raise DiffxError(f"split={split_name!r}: expected heldout, seen, all or auto")
