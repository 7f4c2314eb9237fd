"""Training-step cost of latent diffusion against the same recipe in pixel space, measured side by side.

Both runs build the same model config (``diffx train`` overrides) for 64x64 RGB data: once in pixel space
(``latent=none``), once in the latent space of a VAE file (``latent=vae``: 8x8x4 for SD's factor 8). One
training step (forward, loss, backward, AdamW step) of each is timed in alternation, so machine noise
hits both alike; the encodings are cached by ``diffx train`` and cost nothing per step, so they are not
timed. Prints the median seconds per step of each and their ratio.

    python scripts/bench_latent.py --vae runs/<vae run>/vae.safetensors
    python scripts/bench_latent.py --vae ... --overrides model=mmdit model.patch_size=2 train.batch_size=32
    python scripts/bench_latent.py --vae ... --pixel-overrides model.patch_size=16   # equal token counts
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from diffx.build import DataSpec, build
from diffx.config import config_dir, register_resolvers


def _parts(overrides: list[str], spec: DataSpec):
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=overrides)
    return cfg, build(cfg, spec)


def _step(parts, optimizer, x0: torch.Tensor, cond) -> None:
    loss = parts.objective.loss(parts.model, x0, cond).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="a vae.safetensors from diffx train-vae")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each, after 2 warm-up steps")
    parser.add_argument("--overrides", nargs="*", default=["model=mmdit", "objective=flow", "train.batch_size=32"])
    parser.add_argument("--pixel-overrides", nargs="*", default=[],
                        help="for the pixel run only, e.g. model.patch_size=16 for as many tokens as the latent run")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = DataSpec(3, args.size, 18, tuple(f"c{i}" for i in range(18)))
    batch = {}
    runs = {}
    for name, extra in (("pixel", ["latent=none", *args.pixel_overrides]),
                        ("latent", ["latent=vae", f"latent.ckpt={args.vae}"])):
        cfg, parts = _parts(args.overrides + extra, spec)
        n = cfg.train.batch_size
        x = torch.rand(n, 3, args.size, args.size) * 2 - 1
        x0 = parts.latent.encode(x)  # what the cached dataset holds
        inputs = [parts.condition.input_for("a small red circle at the top left", f"c{i % 18}") for i in range(n)]
        cond = parts.condition.encode(inputs)
        optimizer = torch.optim.AdamW(parts.model.parameters(), lr=1e-4)
        runs[name] = (parts, optimizer, x0, cond)
        batch[name] = tuple(x0.shape)
    times = {name: [] for name in runs}
    for i in range(args.steps + 2):
        for name, (parts, optimizer, x0, cond) in runs.items():
            t0 = time.perf_counter()
            _step(parts, optimizer, x0, cond)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    params = {name: sum(p.numel() for p in r[0].model.parameters()) for name, r in runs.items()}
    print(f"overrides: {' '.join(args.overrides)} (pixel also: {' '.join(args.pixel_overrides) or '-'}); "
          f"{args.steps} timed steps each, alternating; "
          f"{torch.get_num_threads()} torch thread(s)")
    print("| space | x0 batch | parameters | s / step (median) |")
    print("|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {'x'.join(map(str, batch[name]))} | {params[name] / 1e6:.2f} M | {med[name]:.3f} |")
    print(f"pixel / latent time per step: {med['pixel'] / med['latent']:.1f}x")


if __name__ == "__main__":
    main()
