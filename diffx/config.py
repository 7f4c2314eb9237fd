"""Where the config tree lives, the resolvers it uses, and which classes it may name where."""

from __future__ import annotations

import os
import re
import time
import uuid
from functools import lru_cache
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


@lru_cache(maxsize=1)
def target_sites() -> dict[str, dict[str, bool]]:
    """Where the shipped config tree names each ``_target_``: key path in the composed config
    (``"model"``, ``"objective.t_sampler"``) -> {target: is it ``_partial_``}.

    A checkpoint's stored config may name a target only where the shipped tree puts it, so a
    crafted file cannot, say, make its ``model`` a data builder that writes to a path it chooses.
    """
    sites: dict[str, dict[str, bool]] = {}
    for path in sorted(config_dir().rglob("*.yaml")):
        text = path.read_text()
        stack = [(_package(path, text), yaml.safe_load(text))]
        while stack:
            key, node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("_target_"), str):
                    sites.setdefault(key, {})[node["_target_"]] = node.get("_partial_") is True
                stack.extend((_join(key, str(k)), v) for k, v in node.items() if k != "defaults")
            elif isinstance(node, list):
                stack.extend((f"{key}[]", v) for v in node)
    return sites


@lru_cache(maxsize=1)
def allowed_targets() -> frozenset[str]:
    """Every ``_target_`` that the shipped config tree names: the only callables a checkpoint's
    stored config may ask for (and only at the places ``target_sites`` lists)."""
    return frozenset(t for targets in target_sites().values() for t in targets)


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


def _package(path: Path, text: str) -> str:
    """The key path a config file lands at: its group folder (``objective/t_sampler`` ->
    ``objective.t_sampler``), unless a ``# @package`` header in its leading comments says otherwise."""
    group = path.parent.relative_to(config_dir()).as_posix()
    default = "" if group == "." else group.replace("/", ".")
    for line in text.splitlines():
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m:
            head, _, rest = m.group(1).partition(".")
            base = {"_global_": "", "_group_": default}.get(head)
            return _join(base, rest) if base is not None else m.group(1)
    return default


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else prefix or key


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
