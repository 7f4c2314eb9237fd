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
import time

import torch
import torch.nn.functional as F

from diffx import allocator
from diffx.models import fused
from diffx.models.layers import _RMSNormFn


def chains(B: int, N: int, D: int, heads: int, hidden: int):
    """name -> (inputs, fused function, eager function); eager as the MMDiT computed it before the kernels."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    proj, mlp_in = torch.nn.Linear(D, D), torch.nn.Linear(D, hidden)
    q = lambda t: t.view(B, N, heads, D // heads).transpose(1, 2)  # noqa: E731 -- split_heads of a projection
    return {
        "adaLN LayerNorm + modulation": (
            [rand(B, N, D), rand(B, D, scale=0.1), rand(B, D, scale=0.1)],
            lambda x, s, c: fused.modulated_norm(x, s, c, 1e-6),
            lambda x, s, c: torch.addcmul(s[:, None], F.layer_norm(x, (D,), eps=1e-6), 1 + c[:, None])),
        "gated residual of a linear": (
            [rand(B, N, D), rand(B, D), rand(B, N, D)],
            lambda x, g, y: fused.gated_residual(x, g, proj, y),
            lambda x, g, y: torch.addcmul(x, g[:, None], proj(y))),
        "QK-norm RMSNorm": (
            [rand(B, N, D), 1 + rand(D // heads, scale=0.1)],
            lambda x, w: fused.rms_norm(q(x), w, 1e-6),
            lambda x, w: _RMSNormFn.apply(q(x), w, 1e-6)),
        "linear + bias + exact GELU": (
            [rand(B, N, D)],
            lambda x: fused.linear_gelu(x, mlp_in.weight, mlp_in.bias),
            lambda x: F.gelu(mlp_in(x))),
    }


def _time(f, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n


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
    for name, (inputs, ours, eager) in chains(args.batch, 256, 384, 6, 1536).items():
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
            rounds = [[_time(c, args.steps) for c in calls] for _ in range(args.rounds)]
            ms = [1e3 * statistics.median(r[k] for r in rounds) for k in (0, 1)]
            if mode != "forward":
                total = [total[0] + ms[0], total[1] + ms[1]]
            line.append(f"{mode} {ms[0]:6.2f} vs {ms[1]:6.2f} ms ({ms[1] / ms[0]:.2f}x)")
        print(" | ".join(line), flush=True)
    print(f"{'all four, forward + backward':30s} {total[0]:.1f} vs {total[1]:.1f} ms ({total[1] / total[0]:.2f}x)")


if __name__ == "__main__":
    main()
