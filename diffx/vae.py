"""A trained VAE as one self-describing file, and the latent scale that makes its encodings fit diffusion.

``diffx train-vae`` writes ``vae.safetensors``: the autoencoder's weights, with its resolved config, the
data's shapes, the training step, and ``scale``/``shift`` in the metadata. Latent diffusion trains on
``(mean - shift) * scale``, fitted on the training images so that it has mean 0 and standard deviation 1
(Rombach et al. 2022, sec. 4.3.2: SD's 0.18215; SD3's 1.5305 and shift 0.0609 came from the same idea).

A VAE file may come from anywhere, so reading one trusts nothing in it, as for model checkpoints
(diffx/checkpoint.py): nothing is unpickled, the metadata is checked against a schema, every
``_target_`` must be one the shipped config tree names at that place, the keys must fit their
targets, and the weights must fit the autoencoder its config builds (checked on the meta device,
before any memory is spent). Every failure is one DiffxError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from diffx import __version__
from diffx.atomic import atomic_write
from diffx.build import DataSpec
from diffx.checkpoint import check_weights, parse_spec
from diffx.errors import DiffxError, first_line
from diffx.trust import check_config, check_params

FORMAT = "diffx.vae/1"
_KEYS = ("diffx_version", "step", "config", "spec", "scale", "shift")


def save(path, weights: dict[str, torch.Tensor], config: dict, spec: DataSpec, step: int, scale: float,
         shift: float) -> None:
    """Write the autoencoder's weights and everything needed to rebuild and use it, atomically.
    ``config`` is ``{"autoencoder": {...}, "data": {...}}``, resolved."""
    metadata = {"format": FORMAT, "diffx_version": __version__, "step": str(step), "config": json.dumps(config),
                "spec": json.dumps(spec.to_dict()), "scale": repr(float(scale)), "shift": repr(float(shift))}
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@dataclass
class VAEFile:
    """A loaded VAE: the autoencoder (eval mode, frozen) and what its file says about it."""

    autoencoder: nn.Module
    scale: float
    shift: float
    sha256: str  # of the file's bytes: what a cache of encodings is keyed on
    step: int
    spec: DataSpec
    config: dict


def load(path, device=None) -> VAEFile:
    """Read, check and load a VAE file; every failure is one DiffxError naming it (``latent.ckpt=PATH``)."""
    path = Path(path)
    where = f"latent.ckpt={path}"
    if not path.is_file():
        raise DiffxError(f"{where}: no such file (expected a vae.safetensors written by diffx train-vae)")
    with _open(path, where) as f:  # the header is read and checked; no weight is read until the end
        config, spec, step, scale, shift = _parse_metadata(f.metadata() or {}, where)
        check_config(config, where)
        try:
            check_params(_omegaconf(config["autoencoder"]), "autoencoder")
        except DiffxError as e:
            raise DiffxError(f"{where}: its stored config does not fit this diffx: {e}") from None
        # The stored config decides the size: build on the meta device first (no memory), so weights
        # that do not fit it are refused before anything is allocated.
        with torch.device("meta"):
            skeleton = _build(config, spec, where)
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        check_weights({k: (tuple(v.shape), v.is_floating_point()) for k, v in skeleton.state_dict().items()},
                      found, where)
        autoencoder = _build(config, spec, where)
        weights = {k: f.get_tensor(k) for k in f.keys()}
        try:
            autoencoder.load_state_dict(weights, strict=True)
        except RuntimeError as e:  # check_weights saw the shapes; this is a last line of defence
            raise DiffxError(f"{where}: weights do not fit its stored config ({first_line(e)})") from None
    autoencoder.to(device).eval().requires_grad_(False)
    return VAEFile(autoencoder, scale, shift, sha256(path), step, spec, config)


def sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def fit_scale_shift(autoencoder: nn.Module, batches, device) -> tuple[float, float]:
    """``(scale, shift)`` = (1 / std, mean) of the posterior means over ``batches``, all latent elements
    pooled, so that ``(mean - shift) * scale`` has mean 0 and standard deviation 1 over that data.

    ``batches`` yields image tensors (B, C, H, W) in [-1, 1] or dicts holding them under ``"x"`` (a
    DataLoader over a diffx dataset). Sums are kept in float64 on the device: one pass, one sync.
    """
    total = torch.zeros(3, dtype=torch.float64, device=device)  # [count, sum, sum of squares]
    for batch in batches:
        x = batch["x"] if isinstance(batch, dict) else batch
        mean = autoencoder.encode(x.to(device))[0].double()
        total += torch.stack([torch.tensor(mean.numel(), dtype=torch.float64, device=device),
                              mean.sum(), mean.pow(2).sum()])
    count, s, ss = total.tolist()
    if count == 0:
        raise DiffxError("fit_scale_shift: no images to fit the latent scale on")
    mu = s / count
    std = math.sqrt(max(ss / count - mu * mu, 0.0))
    if not (math.isfinite(std) and std > 0):
        raise DiffxError(f"the encoder's latents have standard deviation {std} over the training images; "
                         "cannot scale them to unit variance (did training diverge?)")
    return 1.0 / std, mu


@contextmanager
def _open(path: Path, where: str):
    """``safe_open`` (which checks the header against the file's size), with a file it cannot read,
    or a tensor it cannot return, reported as one line naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffxError(f"{where}: not a valid safetensors file, truncated or corrupted? ({first_line(e)}); "
                         "re-train or re-copy it") from None


def _parse_metadata(meta: dict, where: str) -> tuple[dict, DataSpec, int, float, float]:
    """The VAE metadata schema: format, required keys, JSON types, a finite positive scale."""
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise DiffxError(f"{where}: metadata format is {fmt!r}, expected {FORMAT!r} "
                         "(a VAE written by diffx train-vae; a model checkpoint is not one)")
    missing = [k for k in _KEYS if k not in meta]
    _expect(not missing, where, f"metadata lacks {missing}")
    try:
        config, spec_d = json.loads(meta["config"]), json.loads(meta["spec"])
        step, scale, shift = int(meta["step"]), float(meta["scale"]), float(meta["shift"])
    except (ValueError, RecursionError) as e:
        raise DiffxError(f"{where}: malformed diffx metadata ({first_line(e)}); the file is corrupted") from None
    _expect(step >= 0, where, f"metadata step={step} is negative")
    _expect(math.isfinite(scale) and scale > 0 and math.isfinite(shift), where,
            f"metadata scale={scale}, shift={shift}: expected a finite scale > 0 and a finite shift")
    _expect(isinstance(config, dict) and isinstance(config.get("autoencoder"), dict), where,
            "metadata config lacks the autoencoder section")
    _expect(isinstance(config.get("data", {}), dict), where, "metadata config.data is not a JSON object")
    _expect(isinstance(spec_d, dict), where, "metadata spec is not a JSON object")
    return config, parse_spec(spec_d, where), step, scale, shift


def _omegaconf(node: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create(node)


def _build(config: dict, spec: DataSpec, where: str) -> nn.Module:
    """The autoencoder of the stored config, shaped by the stored spec; any failure is one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    try:
        return instantiate(_omegaconf(config["autoencoder"]), in_channels=spec.channels, image_size=spec.image_size)
    except DiffxError as e:
        raise DiffxError(f"{where}: its stored config does not build: {e}") from None
    except (InstantiationException, OmegaConfBaseException, TypeError, ValueError, RecursionError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, DiffxError) else e
        raise DiffxError(f"{where}: its stored config does not build ({first_line(cause)})") from None


def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise DiffxError(f"{where}: {what}; the file is corrupted or not a diffx VAE")
