"""Resume state of a training run: raw weights, EMA, optimizer, warm-up, RNG and data position.

Kept apart from the inference checkpoint (``model.safetensors``). Tensors are safetensors; only the
optimizer state, which this process wrote itself, goes through ``torch.save`` and is read back with
``torch.load(weights_only=True)``, which refuses to unpickle code. Each state is one folder written
beside the others and moved in whole, so an interrupted save leaves the previous state loadable.

``train.keep_last=1`` keeps one state, ``state/``, replaced at each save; ``K > 1`` keeps the last K as
``state-<step>/``. Loading reads the newest complete one, whatever its name.

A state records the number of processes and the per-process batch it was written with: the data
position is counted in rounds of ``processes x batch_size`` images, so a run resumes on another number
of processes only with the same images per round (``_check_layout``).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffx.atomic import OLD_SUFFIX, atomic_dir
from diffx.errors import DiffxError, first_line

STATE = "state"
# state (keep_last=1), state-<step> (keep_last > 1), and the <name>.old that atomic_dir keeps while it
# swaps a folder in (the only complete copy if a crash came between its two renames)
_STATE_NAME = re.compile(rf"{STATE}(-\d+)?({re.escape(OLD_SUFFIX)})?")
# keys that name, place or extend a run rather than decide what it trains: resume=auto ignores them
RUN_KEYS = ("hydra", "run_dir", "resume", "out", "train.steps", "train.keep_last")


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


def states(run_dir: Path) -> list[Path]:
    """The run's complete resume states, oldest first (by step; a folder beats its ``.old`` copy).

    A folder appears whole or not at all (``atomic_dir``), so one with a ``trainer.json`` is complete;
    one whose ``trainer.json`` cannot be read sorts first, and fails in ``load_state`` if it is all there is."""
    found = []
    for folder in run_dir.iterdir() if run_dir.is_dir() else ():
        if _STATE_NAME.fullmatch(folder.name) and (folder / "trainer.json").is_file():
            try:
                step = int(json.loads((folder / "trainer.json").read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                step = -1
            found.append((step, not folder.name.endswith(OLD_SUFFIX), folder.name, folder))
    return [folder for *_, folder in sorted(found)]


def state_exists(run_dir: Path) -> bool:
    return bool(states(run_dir))


def check_resumable(run_dir) -> None:
    if str(run_dir) == "auto":  # diffx.config.AUTO: the run is picked by diffx.config.run_dir
        return
    if not state_exists(Path(run_dir)):
        raise DiffxError(f"resume={run_dir}: no resume state there (expected {Path(run_dir) / STATE}/trainer.json "
                         "or state-<step>/trainer.json, written by diffx train); pass the directory of an earlier run, "
                         "or resume=auto")


def save_state(run_dir: Path, accelerator, model, ema, optimizer, scheduler, step: int,
               train=None, generators: tuple[torch.Generator, ...] = ()) -> None:
    """Write the whole resume state as one folder moved in atomically, then drop the states beyond
    ``train.keep_last``: at every instant a complete state exists, so a save killed midway loses nothing.

    ``train`` (the run's ``train`` config) gives ``keep_last`` and the batch layout recorded with the
    state; ``generators`` are the training draws' (``diffx.train``), saved with the global RNG."""
    raw = accelerator.unwrap_model(model)
    keep = int(train.get("keep_last", 1)) if train is not None else 1
    layout = {} if train is None else {"world_size": accelerator.num_processes, "batch_size": int(train.batch_size),
                                       "grad_accum": int(train.get("grad_accum", 1))}
    rng = {"torch": torch.get_rng_state()} | {f"draws{i}": g.get_state() for i, g in enumerate(generators)}

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in raw.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({
            "step": step, "ema_updates": ema.updates, "scheduler": scheduler.state_dict(), **layout}))

    folder = run_dir / (STATE if keep == 1 else f"{STATE}-{step}")
    atomic_dir(folder, fill, replace=True)
    older = [f for f in states(run_dir) if f != folder]
    for stale in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)


def _match_layouts(optimizer) -> None:
    """Give each per-parameter state tensor (AdamW's moments) its parameter's memory layout. A state
    saved by a run whose conv weights were NCHW, resumed with ``model.channels_last=true`` (or the
    reverse), would otherwise meet the fused CPU AdamW, which pairs elements by memory position and
    silently mixes them up (measured: a 0.17 error after one step on a 3x3 conv)."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def load_state(run_dir: Path, accelerator, model, ema, optimizer, scheduler, train=None,
               generators: tuple[torch.Generator, ...] = ()) -> int:
    """Restore the newest state ``save_state`` wrote; returns the step to continue from. With ``train``,
    a state written with another batch layout is refused first (``_check_layout``)."""
    folder = states(run_dir)[-1]
    try:
        meta = json.loads((folder / "trainer.json").read_text())
        if train is not None:
            _check_layout(folder, meta, accelerator.num_processes, train)
        accelerator.unwrap_model(model).load_state_dict(load_file(str(folder / "model.safetensors")))
        ema.model.load_state_dict(load_file(str(folder / "ema.safetensors")))
        # weights_only=True: the safe unpickler, which loads tensors and plain containers and
        # refuses anything that would import or call code.
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        _match_layouts(optimizer)
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        for i, g in enumerate(generators):  # a state written before they were saved: they start from the seed
            if f"draws{i}" in rng:
                g.set_state(rng[f"draws{i}"])
        scheduler.load_state_dict(meta["scheduler"])
        ema.updates = int(meta["ema_updates"])
        step = int(meta["step"])
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, pickle.UnpicklingError) as e:
        raise DiffxError(f"resume state {folder} is unreadable or does not fit this config "
                         f"({first_line(e)}); "
                         "resume with the run's own config, or start a new run") from None
    return step


def _check_layout(folder: Path, meta: dict, world_size: int, train) -> None:
    """A run continues exactly on any number of processes that sees the same images per round
    (``processes x batch_size``: the data order and position are counted in such rounds, and the
    training draws are made for a whole round) and the same ``grad_accum``; anything else is refused.
    States written before diffx recorded the layout are not checked."""
    if "world_size" not in meta:
        return
    (n0, b0, a0) = int(meta["world_size"]), int(meta["batch_size"]), int(meta.get("grad_accum", 1))
    (n1, b1, a1) = world_size, int(train.batch_size), int(train.get("grad_accum", 1))
    if n0 * b0 == n1 * b1 and a0 == a1:
        return
    fix = f"train.batch_size={n0 * b0 // n1}" if n0 * b0 % n1 == 0 else f"{n0} processes and train.batch_size={b0}"
    raise DiffxError(f"resume state {folder} was written by {_processes(n0)} x train.batch_size={b0}, "
                     f"train.grad_accum={a0}; this run has {_processes(n1)} x train.batch_size={b1}, train.grad_accum={a1}: "
                     f"a run continues only with the same processes x batch_size ({n0 * b0} images a round) and "
                     f"grad_accum; resume with {fix} train.grad_accum={a0}")


def _processes(n: int) -> str:
    return f"{n} process" + "es" * (n != 1)


def newest_run(out: Path, cfg) -> Path | None:
    """``resume=auto``: of the runs directly under ``out`` that have a resume state, the one whose
    stored ``config.yaml`` equals ``cfg`` (both ``comparable``) and whose newest state was written last."""
    want, found = comparable(cfg), []
    for run in out.iterdir() if out.is_dir() else ():
        saved = states(run)
        if not saved or not (run / "config.yaml").is_file():
            continue
        try:
            same = comparable(OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))) == want
        except Exception:  # noqa: BLE001 - an unreadable config.yaml is not the same config
            same = False
        if same:
            found.append(((saved[-1] / "trainer.json").stat().st_mtime, run))
    return max(found)[1] if found else None


def comparable(cfg) -> dict:
    """A config as a plain dict without ``RUN_KEYS``: a live config (DictConfig) is resolved key by key,
    never reading ``run_dir`` (the directory being chosen); a stored one (a dict loaded from a run's
    ``config.yaml``) is resolved already and taken as it is."""
    top = [k for k in RUN_KEYS if "." not in k]
    if isinstance(cfg, dict):
        tree = {k: v for k, v in cfg.items() if k not in top}
    else:
        tree = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in ((k, cfg[k]) for k in cfg.keys() if k not in top)}
    for key in RUN_KEYS:
        parent, _, leaf = key.rpartition(".")
        if isinstance(tree.get(parent), dict):
            tree[parent].pop(leaf, None)
    return tree


def start(run_dir: Path, cfg, accelerator, model, ema, optimizer, scheduler,
          generators: tuple[torch.Generator, ...] = ()) -> int:
    """The step a run starts from: its newest resume state, if it has one, is loaded into the model,
    EMA, optimizer, scheduler and ``generators``; a run dir that holds weights but no state is never
    overwritten. The main process then writes the run's resolved ``config.yaml``."""
    step, auto = 0, cfg.get("resume") == "auto"
    if state_exists(run_dir):
        step = load_state(run_dir, accelerator, model, ema, optimizer, scheduler, cfg.train, generators)
        accelerator.print(f"resuming {run_dir} at step {step}" + (
            f" (resume=auto: the newest run under {cfg.out} with this config)" if auto else ""))
    elif run_dir.exists() and any(run_dir.glob("*.safetensors")):
        raise DiffxError(f"run dir {run_dir} holds weights but no resume state; refusing to overwrite it")
    elif auto:
        accelerator.print(f"resume=auto: no run under {cfg.out} has this config and a resume state; starting {run_dir}")
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
