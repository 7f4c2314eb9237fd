"""Where the config tree lives and the resolvers it uses (which classes it may name where: ``diffx.trust``)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import yaml
from omegaconf import OmegaConf


def config_dir() -> Path:
    """``conf/`` beside the package in a source checkout, else the copy a wheel installs as ``diffx/conf``
    (pyproject.toml maps it there)."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"diffx's config tree is missing: neither {package.parent / 'conf'} nor {package / 'conf'}")


def options_with_key(group: str, key: str) -> list[str]:
    """The options of config group ``group`` (``"objective"``) whose YAML has top-level ``key``:
    lets an error about ``objective.prediction`` say which option has it."""
    folder = config_dir() / group
    found = []
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        node = yaml.safe_load(path.read_text())
        if isinstance(node, dict) and key in node:
            found.append(path.stem)
    return found


# One id per process: two runs started in the same second still get different directories.
_RUN_ID = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 100000:05d}{uuid.uuid4().hex[:4]}"


def run_id() -> str:
    return _RUN_ID


def run_dir(out: str, resume: str | None) -> str:
    """The run directory: the one being resumed, else a new unique one under ``out``.

    ``resume`` must name a run with a resume state; checked here, where Hydra asks for the
    directory, so that a wrong path fails before Hydra writes its files into it."""
    if resume:
        from diffx.resume import check_resumable

        check_resumable(resume)
        return str(resume)
    return f"{out}/{_RUN_ID}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("diffx_run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("diffx_run_dir", run_dir, replace=True)
