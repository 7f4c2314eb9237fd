"""Self-describing, code-free checkpoints: safetensors weights with the resolved config in the metadata.

One ``model.safetensors`` rebuilds the model: its metadata holds the model/latent/objective/
schedule/data configs, the shapes the data decided, the training step and the diffx version.
Nothing is unpickled, and the stored config is data: every ``_target_`` in it must be one that
diffx's own config tree names before anything is instantiated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffx import __version__
from diffx.build import DataSpec, Parts, build
from diffx.config import allowed_targets
from diffx.errors import DiffxError

FORMAT = "diffx.model/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``: a crash or a full disk
    leaves the previous file intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path, weights: dict[str, torch.Tensor], parts: dict, spec: DataSpec, step: int) -> None:
    """Write inference weights and everything needed to rebuild the model, atomically."""
    metadata = {
        "format": FORMAT,
        "diffx_version": __version__,
        "step": str(step),
        "config": json.dumps(parts),
        "spec": json.dumps(spec.to_dict()),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@dataclass
class Checkpoint:
    parts: dict
    spec: DataSpec
    step: int
    version: str
    weights: dict[str, torch.Tensor]


def read(path) -> Checkpoint:
    """Read and validate a checkpoint; every failure is a DiffxError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DiffxError(f"ckpt={path}: no such file (expected a diffx model.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffxError(f"ckpt={path}: not a readable safetensors file ({_first_line(e)})") from None
    if meta.get("format") != FORMAT:
        raise DiffxError(f"ckpt={path}: metadata format {meta.get('format')!r}, expected {FORMAT!r} "
                         "(is this a diffx checkpoint?)")
    try:
        parts, spec = json.loads(meta["config"]), DataSpec(**_spec_fields(json.loads(meta["spec"])))
        step = int(meta["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise DiffxError(f"ckpt={path}: malformed diffx metadata ({_first_line(e)})") from None
    check_targets(parts, where=f"ckpt={path}")
    return Checkpoint(parts, spec, step, meta.get("diffx_version", "?"), weights)


def load(path, device=None) -> tuple[Parts, Checkpoint]:
    """Rebuild the parts from a checkpoint alone and load its weights into the model."""
    ckpt = read(path)
    parts = build(ckpt.parts, ckpt.spec)
    result = parts.model.load_state_dict(ckpt.weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DiffxError(f"ckpt={path}: weights do not fit the stored model config "
                         f"(missing {list(result.missing_keys)[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    parts.model.to(device).eval().requires_grad_(False)
    return parts, ckpt


def _spec_fields(d: dict) -> dict:
    d = dict(d)
    d["class_names"] = tuple(d.get("class_names", ()))
    return d


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def check_targets(node, where: str) -> None:
    """Refuse any ``_target_`` outside the allow-list, before anything is imported or instantiated."""
    allowed = allowed_targets()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            target = item.get("_target_")
            if target is not None and target not in allowed:
                raise DiffxError(f"{where}: config names _target_={target!r}, which is not a diffx class; refusing to load")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
