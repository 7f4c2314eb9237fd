"""Experiment trackers beside the JSONL log: ``train.log_with=null|tensorboard|trackio|wandb|mlflow|aim``,
Accelerate's own trackers (``Accelerator(log_with=...)``), each an optional install.

Accelerate drops a tracker whose package is missing with a debug message only; ``check`` turns that into
one line naming the key and the extra to install, before anything heavy runs. Importing this module is
cheap (no torch, no tracker package): the tracker's package is imported by Accelerate when it starts.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffx.errors import DiffxError

# tracker -> (the import names that provide it, the diffx extra that installs it)
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "trackio": (("trackio",), "trackio"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "aim": (("aim",), "aim"),
}
PROJECT = "diffx"  # the trackers' project (wandb project, mlflow experiment); each run is one run in it


def check(log_with: str | None) -> str | None:
    """``train.log_with``, checked: None or a tracker whose package is installed."""
    if log_with is None:
        return None
    if log_with not in TRACKERS:
        raise DiffxError(f"train.log_with={log_with}: expected null or one of {', '.join(TRACKERS)}")
    modules, extra = TRACKERS[log_with]
    if not any(find_spec(m) for m in modules):
        raise DiffxError(f"train.log_with={log_with} needs the {modules[0]} package, which is not installed: "
                         f"pip install 'diffx[{extra}]'")
    return log_with


def start(accelerator, cfg: DictConfig, run_dir: Path) -> None:
    """Open the run in the configured tracker (a no-op without one), with the resolved config as its
    hyperparameters, flattened to ``{"train.lr": 3e-4, ...}`` scalars as TensorBoard's hparams need.
    Local trackers write under ``<run dir>/trackers`` (``Accelerator(project_dir=...)``)."""
    if not accelerator.log_with:
        return
    name = f"{run_dir.parent.name}/{run_dir.name}"  # e.g. multirun-<id>/3: tells a sweep's jobs apart
    accelerator.init_trackers(PROJECT, config=_flat(OmegaConf.to_container(cfg, resolve=True)),
                              init_kwargs={"wandb": {"name": name}, "trackio": {"name": name},
                                           "mlflow": {"run_name": name}})


def finish(accelerator) -> None:
    """Close the trackers' runs. Not ``accelerator.end_training()``: that also destroys the process
    group, which the next job of a sweep run in the same processes still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _flat(node, prefix: str = "") -> dict:
    """Nested dicts -> one level of dotted keys; values that are not scalars become their string."""
    if not isinstance(node, dict):
        keep = isinstance(node, (bool, int, float, str))
        return {prefix: node if keep else str(node)}
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
