"""How much a text checkpoint's output moves when only one attribute's words change (README, "Text to image").

    python scripts/probe_text.py runs/<run>/model.safetensors [more checkpoints ...]

For a shapes text checkpoint: the norm of the change of the model's output (4 noises at t = 0.9) when the
prompt's position, colour or size words change, and, for a text encoder trained with the model (a
``TextConditioned`` wrapper), how much its output tokens change with the position or colour words.
"""

from __future__ import annotations

import argparse

import torch

from diffx import checkpoint

BASE = "a large red circle at the top left"
SWAPS = {"position": "a large red circle at the bottom right", "colour": "a large blue circle at the top left",
         "size": "a small red circle at the top left"}


@torch.no_grad()
def probe(path: str) -> None:
    parts, header = checkpoint.load(path, "cpu")
    model, condition = parts.model, parts.condition
    x, t = torch.randn(4, *parts.x0_shape, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.9)
    out = {name: model(x, t, condition.encode([text] * 4)) for name, text in {"base": BASE, **SWAPS}.items()}
    moves = "  ".join(f"{k} {(out['base'] - out[k]).norm():.3f}" for k in SWAPS)
    print(f"{path} (step {header.step}): |output| {out['base'].norm():.1f}; output change with {moves}")
    if hasattr(model, "text"):  # a text encoder trained with the model: its tokens, per position in the prompt
        tokens = {k: model.text(condition.encode([v]))["tokens"][0] for k, v in {"base": BASE, **SWAPS}.items()}
        for k in ("position", "colour"):
            change = (tokens["base"] - tokens[k]).norm(dim=-1)[: len(BASE.split()) + 1]
            print(f"  token change with {k} words: {[round(float(c), 2) for c in change]} "
                  f"(token norm ~{tokens['base'].norm(dim=-1)[0]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+")
    for path in parser.parse_args().ckpts:
        probe(path)


if __name__ == "__main__":
    main()
