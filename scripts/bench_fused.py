"""The fused CPU kernels (diffx/models/fused.py) against the eager PyTorch they replace, one chain at a time,
at the sizes of the MMDiT benchmark's image stream (batch 32, 256 tokens, width 384, 6 heads of 64, MLP 1536):
forward, and forward + backward, the two alternating for ``--rounds`` rounds; the median of each.

    OMP_NUM_THREADS=1 python scripts/bench_fused.py
    python scripts/bench_fused.py --batch 2 --rounds 1   # quick: does it run

The whole model's ratio against diffusers is ``scripts/bench_train.py --pairs mmdit`` (``DIFFX_CPU_KERNELS=0``
in the environment runs it without the kernels).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_train import _time  # scripts/ is on the path when a script in it runs

from diffx import allocator
from diffx.models import fused
from diffx.models.layers import Mlp, RMSNorm, modulate


def chains(B: int, N: int, D: int, heads: int, hidden: int):
    """name -> (inputs, function): each chain as the MMDiT calls it, timed with the kernels and within
    ``fused.eager()`` (the path without them)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    norm = torch.nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
    proj, mlp, qk_norm = torch.nn.Linear(D, D), Mlp(D, hidden, "none"), RMSNorm(D // heads)
    q = lambda t: t.view(B, N, heads, D // heads).transpose(1, 2)  # noqa: E731 -- split_heads of a projection
    return {
        "adaLN LayerNorm + modulation": ([rand(B, N, D), rand(B, D, scale=0.1), rand(B, D, scale=0.1)],
                                         lambda x, s, c: modulate(norm, x, s, c)),
        "gated residual of a linear": ([rand(B, N, D), rand(B, D), rand(B, N, D)],
                                       lambda x, g, y: fused.gated_residual(x, g, proj, y)),
        "QK-norm RMSNorm": ([rand(B, N, D)], lambda x: qk_norm(q(x))),
        "linear + bias + exact GELU": ([rand(B, N, D)], mlp.hidden),
    }


def _eager(f):
    def run(*inputs):
        with fused.eager():
            return f(*inputs)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per function per round")
    args = parser.parse_args()
    allocator.keep_freed_memory()  # as bench_train.py: page faults would otherwise decide the ratio
    if fused.kernels() is None:
        raise SystemExit("the fused CPU kernels are not available here (see the warning above)")
    print(f"{torch.get_num_threads()} threads; batch {args.batch}, 256 tokens, width 384, 6 heads, MLP 1536")
    total = [0.0, 0.0]
    cpu = torch.device("cpu")
    for name, (inputs, ours) in chains(args.batch, 256, 384, 6, 1536).items():
        eager = _eager(ours)
        grad = torch.randn_like(ours(*inputs))

        def forward(f):
            def run():
                with torch.no_grad():
                    f(*inputs)
            return run

        def train(f):
            def run():
                torch.autograd.backward(f(*inputs), grad)
            return run

        line = [f"{name:30s}"]
        for mode, wrap in (("forward", forward), ("forward + backward", train)):
            calls = [wrap(ours), wrap(eager)]
            for c in calls:
                c()  # warm-up
            rounds = [[_time(c, args.steps, cpu) for c in calls] for _ in range(args.rounds)]
            ms = [1e3 * statistics.median(r[k] for r in rounds) for k in (0, 1)]
            if mode != "forward":
                total = [total[0] + ms[0], total[1] + ms[1]]
            line.append(f"{mode} {ms[0]:6.2f} vs {ms[1]:6.2f} ms ({ms[1] / ms[0]:.2f}x)")
        print(" | ".join(line), flush=True)
    print(f"{'all four, forward + backward':30s} {total[0]:.1f} vs {total[1]:.1f} ms ({total[1] / total[0]:.2f}x)")


if __name__ == "__main__":
    main()
