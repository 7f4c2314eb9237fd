"""Training steps/s with the data held in memory against the same data streamed (``data.stream=true``),
measured side by side through ``diffx train`` itself.

Three loaders over the same shapes (rendered once into the Arrow cache): held in memory (workers 0),
streamed with items decoded in the main process (workers 0) and streamed in 2 loader workers. Each is
trained in short runs of a tiny UNet, taken in turn for ``--rounds`` rounds so machine noise hits all
alike; the rate is the median of the ``it_s`` that ``log.jsonl`` records per log window, the first
window (start-up, worker launch) left out. Prints a table and each one's ratio to the held rate.

    OMP_NUM_THREADS=1 python scripts/bench_data.py
    OMP_NUM_THREADS=1 python scripts/bench_data.py --size 32 --steps 100 --overrides model=mmdit
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from diffx.config import config_dir, register_resolvers
from diffx.train import train

TINY = ["model.channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "train.warmup=0",
        "train.save_every=100000"]
LOADERS = {"held, workers 0": ["data.stream=false", "train.num_workers=0"],
           "streamed, workers 0": ["data.stream=true", "train.num_workers=0"],
           "streamed, workers 2": ["data.stream=true", "train.num_workers=2"]}


def _rates(overrides: list[str]) -> list[float]:
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=overrides)
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["it_s"] for r in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=2048, help="images in the dataset")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="steps per run; logged every 10")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        common = TINY + [f"data.size={args.size}", f"data.n={args.n}", f"data.cache_dir={tmp}/cache",
                         f"train.batch_size={args.batch}", f"train.steps={args.steps}", "train.log_every=10",
                         *args.overrides]
        rates = {name: [] for name in LOADERS}
        for r in range(args.rounds):
            for k, (name, extra) in enumerate(LOADERS.items()):
                rates[name] += _rates(common + extra + [f"run_dir={Path(tmp) / f'run{r}-{k}'}"])
    med = {name: statistics.median(v) for name, v in rates.items()}
    held = med["held, workers 0"]
    print(f"shapes {args.size}x{args.size}, {args.n} images, batch {args.batch}, tiny UNet, {args.steps} steps x "
          f"{args.rounds} rounds each, in turn; {torch.get_num_threads()} torch thread(s)")
    print("| loader | steps/s (median) | / held |")
    print("|---|---|---|")
    for name, rate in med.items():
        print(f"| {name} | {rate:.2f} | {rate / held:.2f} |")


if __name__ == "__main__":
    main()
