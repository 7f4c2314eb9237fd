"""Where the config tree lives, the resolvers it uses, and the set of classes it may name."""

from __future__ import annotations

import os
import time
import uuid
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import OmegaConf


def config_dir() -> Path:
    """``conf/`` beside the package in a source checkout, else the copy installed as ``diffx.conf``."""
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "train.yaml").is_file():
        return source
    return Path(str(resources.files("diffx.conf")))


@lru_cache(maxsize=1)
def allowed_targets() -> frozenset[str]:
    """Every ``_target_`` that the shipped config tree names: the only callables a checkpoint's
    stored config may ask for."""
    found = set()
    for path in config_dir().rglob("*.yaml"):
        stack = [yaml.safe_load(path.read_text())]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("_target_"), str):
                    found.add(node["_target_"])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return frozenset(found)


# One id per process: two runs started in the same second still get different directories.
_RUN_ID = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 100000:05d}{uuid.uuid4().hex[:4]}"


def run_id() -> str:
    return _RUN_ID


def run_dir(out: str, resume: str | None) -> str:
    """The run directory: the one being resumed, else a new unique one under ``out``."""
    return str(resume) if resume else f"{out}/{_RUN_ID}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("diffx_run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("diffx_run_dir", run_dir, replace=True)
