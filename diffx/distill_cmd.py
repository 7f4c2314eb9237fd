"""``diffx distill``: a teacher checkpoint -> a few-step student (``diffx.distill``), one round at a time.

Reads top to bottom: the teacher -> the method's rounds (each a ``diffx.distill.loop.fit``) -> the last
student copied to ``<run>/model.safetensors``. Every round's student is a checkpoint of its own that
records its native steps and grid, so ``diffx sample ckpt=<run>/model.safetensors`` samples it right.
``run_dir=<run>`` (with the same overrides) continues a stopped run exactly: finished rounds, cached pairs
and resume states are read back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from diffx import checkpoint
from diffx.atomic import atomic_write
from diffx.distill import guided, progressive, reflow
from diffx.distill.loop import Context
from diffx.errors import DiffxError

METHODS = {"progressive": progressive.run, "guided": guided.run, "reflow": reflow.run}


def distill(cfg: DictConfig) -> Path:
    """Distil ``cfg.ckpt`` with ``cfg.method``; returns the final student's ``model.safetensors``."""
    if cfg.method not in METHODS:
        raise DiffxError(f"method={cfg.method}: expected one of {', '.join(METHODS)}")
    run_dir = Path(cfg.run_dir)
    accelerator = Accelerator(cpu=cfg.train.cpu, mixed_precision="no")
    if accelerator.num_processes > 1:
        raise DiffxError("diffx distill runs on one process; launch it without accelerate/torchrun")
    set_seed(cfg.seed)
    console = Console()
    teacher, ckpt = checkpoint.load(cfg.ckpt, accelerator.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    console.print(f"distilling {cfg.ckpt} (step {ckpt.step}, {teacher.condition.description}) by method={cfg.method} "
                  f"into {run_dir}")
    final = METHODS[cfg.method](Context(cfg, teacher, ckpt, run_dir, accelerator, console))
    path = run_dir / "model.safetensors"
    atomic_write(path, lambda tmp: shutil.copyfile(final, tmp))
    native = checkpoint.read_header(path).sampling
    console.print(f"saved {path}: a {native['steps']}-step student; sample it with diffx sample ckpt={path}")
    return path
