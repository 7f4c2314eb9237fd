"""The UNet's upsampling layer (``diffx.models.upsample``) against the computation it replaced, nearest 2x
then the 3x3 conv (``Upsample.reference``), with the same weights: the layer alone (forward and backward, both
memory orders) and the KL autoencoder's decoder (a decode, and forward + backward of the autoencoder). The two
alternate for ``--rounds`` rounds; medians and their ratio are printed. One thread gives the README's figures:

    OMP_NUM_THREADS=1 python scripts/bench_upsample.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diffx import allocator
from diffx.models.autoencoder import AutoencoderKL
from diffx.models.upsample import Upsample

LAYERS = [(128, 16), (128, 8)]  # (channels, input side), batch 32: the benchmark UNet's two upsamplings
VAES = [("autoencoder=kl_f8 (16 channels)", dict(channels=16), 16),
        ("ldm kl-f8 widths (128 channels, [1, 2, 4, 4], 2 blocks)",
         dict(channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=32), 4)]


def alternate(calls: dict, rounds: int) -> dict:
    """Median seconds of each call, the calls alternating round by round (after one warm-up each)."""
    times = {name: [] for name in calls}
    for f in calls.values():
        f()
    for _ in range(rounds):
        for name, f in calls.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(what: str, t: dict) -> None:
    print(f"{what}: interpolate + conv {1e3 * t['old']:.0f} ms, diffx {1e3 * t['new']:.0f} ms, "
          f"{t['old'] / t['new']:.2f}x", flush=True)


def use_reference(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, Upsample):
            if on:
                m.forward = m.reference
            else:
                m.__dict__.pop("forward", None)  # back to the class's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    allocator.keep_freed_memory()
    torch.manual_seed(0)
    for layout in (torch.channels_last, torch.contiguous_format):
        for ch, side in LAYERS:
            layer = Upsample(ch).to(memory_format=layout)
            x = torch.randn(32, ch, side, side).contiguous(memory_format=layout).requires_grad_()
            g = torch.randn(32, ch, 2 * side, 2 * side).contiguous(memory_format=layout)
            t = alternate({"new": lambda: layer(x).backward(g), "old": lambda: layer.reference(x).backward(g)},
                          args.rounds)
            report(f"layer {ch} ch, {side}x{side} -> {2 * side}x{2 * side}, batch 32, "
                   f"{'NHWC' if layout == torch.channels_last else 'NCHW'}, forward + backward", t)
    for name, kw, batch in VAES:
        vae = AutoencoderKL(3, 64, **kw)
        z, x = torch.randn(batch, 4, 8, 8), torch.randn(batch, 3, 64, 64)

        def decode(ref: bool):
            use_reference(vae, ref)
            with torch.no_grad():
                vae.decode(z)

        def train(ref: bool):
            use_reference(vae, ref)
            F.mse_loss(vae(x)[0], x).backward()

        report(f"VAE {name}, batch {batch}, 64x64: decode",
               alternate({"new": lambda: decode(False), "old": lambda: decode(True)}, args.rounds))
        report(f"VAE {name}, batch {batch}, 64x64: forward + backward",
               alternate({"new": lambda: train(False), "old": lambda: train(True)}, args.rounds))


if __name__ == "__main__":
    main()
