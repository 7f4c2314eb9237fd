"""Resume state of a training run: raw weights, EMA, optimizer, warm-up, RNG and data position.

Kept apart from the inference checkpoint (``model.safetensors``). Tensors are safetensors; only the
optimizer state, which this process wrote itself, goes through ``torch.save`` and is read back with
``torch.load(weights_only=True)``, which refuses to unpickle code. The folder is written beside the
old one and swapped in, so an interrupted save leaves the previous state loadable.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffx.atomic import OLD_SUFFIX, atomic_dir
from diffx.errors import DiffxError, first_line

STATE = "state"
_OLD = STATE + OLD_SUFFIX  # where atomic_dir keeps the previous state while it swaps in a new one


class EpochSampler(torch.utils.data.Sampler):
    """A fresh seeded permutation each epoch, ``perm(seed, epoch)``, so a resumed run replays the same
    order; ``skip`` drops the first samples of the next epoch iterated (the ones already trained on)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        skip, self.skip = self.skip, 0
        return iter(perm[skip:])

    def __len__(self) -> int:
        return self.n - self.skip


def state_exists(run_dir: Path) -> bool:
    return (run_dir / STATE / "trainer.json").is_file() or (run_dir / _OLD / "trainer.json").is_file()


def check_resumable(run_dir) -> None:
    if not state_exists(Path(run_dir)):
        raise DiffxError(f"resume={run_dir}: no resume state there (expected {Path(run_dir) / STATE}/trainer.json, "
                         "written by diffx train); pass the directory of an earlier run")


def save_state(run_dir: Path, accelerator, model, ema, optimizer, scheduler, step: int) -> None:
    """Write the whole resume state as one folder swapped in atomically: at every instant ``state`` or
    ``state.old`` holds a complete state, so a save killed midway loses nothing."""
    raw = accelerator.unwrap_model(model)

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in raw.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({
            "step": step, "ema_updates": ema.updates, "scheduler": scheduler.state_dict()}))

    atomic_dir(run_dir / STATE, fill, replace=True)


def load_state(run_dir: Path, accelerator, model, ema, optimizer, scheduler) -> int:
    """Restore everything ``save_state`` wrote; returns the step to continue from."""
    folder = run_dir / STATE if (run_dir / STATE / "trainer.json").is_file() else run_dir / _OLD
    try:
        meta = json.loads((folder / "trainer.json").read_text())
        accelerator.unwrap_model(model).load_state_dict(load_file(str(folder / "model.safetensors")))
        ema.model.load_state_dict(load_file(str(folder / "ema.safetensors")))
        # weights_only=True: the safe unpickler, which loads tensors and plain containers and
        # refuses anything that would import or call code.
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
        scheduler.load_state_dict(meta["scheduler"])
        ema.updates = int(meta["ema_updates"])
        step = int(meta["step"])
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, pickle.UnpicklingError) as e:
        raise DiffxError(f"resume state {folder} is unreadable or does not fit this config "
                         f"({first_line(e)}); "
                         "resume with the run's own config, or start a new run") from None
    return step


def start(run_dir: Path, cfg, accelerator, model, ema, optimizer, scheduler) -> int:
    """The step a run starts from: its resume state, if it has one, is loaded into the model, EMA,
    optimizer and scheduler; a run dir that holds weights but no state is never overwritten. The main
    process then writes the run's resolved ``config.yaml``."""
    step = 0
    if state_exists(run_dir):
        step = load_state(run_dir, accelerator, model, ema, optimizer, scheduler)
        accelerator.print(f"resuming {run_dir} at step {step}")
    elif run_dir.exists() and any(run_dir.glob("*.safetensors")):
        raise DiffxError(f"run dir {run_dir} holds weights but no resume state; refusing to overwrite it")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return step


def batches(loader, sampler: EpochSampler, start: int):
    """An endless stream of batches that resumes at batch ``start`` of the same shuffled order."""
    epoch, done = divmod(start, len(loader))
    while True:
        # Accelerate re-announces the loader's epoch to the sampler at each pass; keep them in step.
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else sampler.set_epoch(epoch)
        sampler.skip = done * getattr(loader, "total_batch_size", loader.batch_size)
        yield from loader
        epoch, done = epoch + 1, 0
