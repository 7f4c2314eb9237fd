"""Peak memory of ``diffx train`` with and without activation checkpointing (``model.checkpointing``).

Each setting runs a short ``diffx train`` (the real loop: Accelerate, EMA, AdamW) in a fresh Python
process, which reports its own peak resident set size (``getrusage`` max RSS: what the machine had to
hold; Python-level tracers such as tracemalloc do not see torch's allocations) and its RSS once torch
and diffx are imported. Their difference is what the training run itself needed: the activations kept
for backward, the transient buffers of backward, and what the allocator keeps of freed blocks. The
activations kept for backward are also counted exactly, in bytes of the distinct storages that one
training forward of the saved model hands to autograd. Then the time per training step (forward, loss,
backward, AdamW) of the two saved models is taken in one process, alternating steps so that machine
noise hits both alike (median after 2 warm-up steps each). Prints a Markdown table.

    python scripts/bench_memory.py                                   # UNet and MMDiT, 32x32, batch 64
    python scripts/bench_memory.py --models unet --overrides train.batch_size=128

Runs on the CPU (``train.cpu=true``) and one thread by default; for GPU memory, read
``torch.cuda.max_memory_allocated`` instead: RSS does not count device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

BASE = ["data.size=32", "data.n=512", "train.batch_size=64", "train.steps=4", "train.log_every=2",
        "train.save_every=1000", "train.warmup=0", "train.cpu=true", "train.sample_every=0"]
SETTINGS = ("false", "true")  # model.checkpointing


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_child(overrides: list[str]) -> dict:
    """Train one setting in this (fresh) process: its peak RSS, and its RSS before training."""
    import torch  # noqa: F401 - imported before the baseline reading, as train() needs it
    from hydra import compose, initialize_config_dir

    import diffx.train
    from diffx.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=overrides)
    before = _max_rss_mib()
    diffx.train.train(cfg)
    return {"peak_mib": _max_rss_mib(), "before_mib": before}


def time_child(ckpts: list[str], batch: int, steps: int) -> dict:
    """The saved models of each setting: MiB kept for backward by one training forward, and the median
    seconds of a training step, the settings' steps alternating."""
    import statistics
    import time

    import torch
    from torch.autograd.graph import saved_tensors_hooks

    from diffx import checkpoint

    torch.manual_seed(0)
    runs = []
    for path in ckpts:
        parts, _ = checkpoint.load(path)
        model = parts.model.train().requires_grad_(True)
        runs.append((parts, model, torch.optim.AdamW(model.parameters())))
    parts = runs[0][0]
    x0 = torch.rand(batch, *parts.x0_shape) * 2 - 1
    cond = {"label": torch.randint(0, parts.spec.num_classes, (batch,))} if parts.spec.num_classes else None

    kept = []
    for parts, model, _ in runs:
        storages = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with saved_tensors_hooks(keep, lambda t: t):
            parts.objective.loss(model, x0, cond).mean()
        kept.append(sum(storages.values()) / 2**20)

    times = [[] for _ in runs]
    for i in range(steps + 2):
        for (parts, model, optimizer), spent in zip(runs, times):
            start = time.perf_counter()
            parts.objective.loss(model, x0, cond).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                spent.append(time.perf_counter() - start)
    return {"kept_mib": kept, "s_per_step": [statistics.median(t) for t in times]}


def _child(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(_child.threads)}
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["unet", "mmdit"], help="conf/model options")
    parser.add_argument("--overrides", nargs="*", default=[], help="more diffx train overrides, after the defaults")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each setting")
    parser.add_argument("--memory-child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--time-child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child)))
        return
    if args.time_child is not None:
        batch, *ckpts = args.time_child
        print(json.dumps(time_child(ckpts, int(batch), args.steps)))
        return

    _child.threads = args.threads
    rows = ["| model | `model.checkpointing` | peak RSS (MiB) | of which training | kept for backward | s / step |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            overrides = [f"model={model}", *BASE, *args.overrides, f"data.cache_dir={Path(tmp) / 'cache'}"]
            runs = {on: Path(tmp) / f"{model}-{on}" for on in SETTINGS}
            memory = {on: _child("--memory-child", *overrides, f"model.checkpointing={on}", f"run_dir={run}")
                      for on, run in runs.items()}
            batch = next(o.split("=")[1] for o in reversed(overrides) if o.startswith("train.batch_size="))
            timed = _child("--steps", str(args.steps), "--time-child", batch,
                           *(str(run / "model.safetensors") for run in runs.values()))
            for i, on in enumerate(SETTINGS):
                m = memory[on]
                rows.append(f"| {model} | {on} | {m['peak_mib']:.0f} | {m['peak_mib'] - m['before_mib']:.0f} | "
                            f"{timed['kept_mib'][i]:.0f} | {timed['s_per_step'][i]:.2f} |")
                print(rows[-1], file=sys.stderr, flush=True)  # progress
    malloc = "".join(f" {k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    print(f"diffx train {' '.join(BASE + args.overrides)} (OMP_NUM_THREADS={args.threads}{malloc})\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
