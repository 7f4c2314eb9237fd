"""Where diffusion happens: pixel space (``latent=none``) or a learned latent space (``latent=vae``).

Every latent space implements ``Latent``: it maps data ``x`` (B, C, H, W) in [-1, 1] to ``x0`` for the
objective and back, and declares how it changes shape, so the model's ``in_channels`` and
``image_size`` follow from the data (diffx/build.py). With a VAE, ``x0`` is the *scaled* latent
``(encoding - shift) * scale`` (Rombach et al. 2022, sec. 4.3 and App. G: unit variance for the
diffusion), so the objective and samplers see data of the usual scale.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffx.atomic import atomic_write
from diffx.errors import DiffxError
from diffx.progress import work

CACHE_DIR = "~/.cache/diffx/latents"


class Latent(nn.Module):
    """The interface. Class attributes, readable without building the space (``diffx.validate``):

    - ``factor``: spatial downsampling, or None when only the loaded space knows it;
    - ``scale``, ``shift``: ``x0 = (encoding - shift) * scale``;
    - ``x0_range``: where ``x0`` lives, (lo, hi) or None if unbounded; the denoiser clips x0_hat to it;
    - ``cache``: True when the encoding is deterministic and costly (a VAE's posterior mean), so the
      training set is encoded once before the loop; False to encode every batch (free, or random).
    """

    factor: int | None = 1
    scale: float = 1.0
    shift: float = 0.0
    x0_range: tuple[float, float] | None = None
    cache: bool = False

    def channels(self, data_channels: int) -> int:
        raise NotImplementedError

    def shape(self, data_channels: int, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of ``x0`` for square data of ``data_channels`` x ``image_size``^2."""
        return self.channels(data_channels), image_size // self.factor, image_size // self.factor

    def encode(self, x: Tensor) -> Tensor:
        """Data in [-1, 1] -> ``x0``."""
        raise NotImplementedError

    def decode(self, x0: Tensor) -> Tensor:
        """``x0`` -> data in [-1, 1]."""
        raise NotImplementedError

    def record(self) -> dict:
        """Config keys a diffusion checkpoint stores to pin this exact space (a VAE's ``sha256``)."""
        return {}

    def fingerprint(self) -> str | None:
        """A stable id of the encoder, for the on-disk cache of encoded training sets; None: no disk cache."""
        return None


class Identity(Latent):
    """Pixel-space diffusion: ``x0`` is the image itself; nothing to cache."""

    factor = 1
    x0_range = (-1.0, 1.0)

    def channels(self, data_channels: int) -> int:
        return data_channels

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


class VAE(Latent):
    """The latent space of a VAE trained by ``diffx train-vae`` (Rombach et al. 2022): ``x0`` is the
    posterior mean, scaled, ``(mean - shift) * scale``, with ``scale`` and ``shift`` fitted to the data
    and stored in the VAE file. Deterministic and costly, so a training set is encoded once.

    ``sha256`` pins the file: a diffusion checkpoint records it at training time and refuses any other
    VAE file at ``ckpt`` with a one-line error. The VAE's weights stay in their own file.
    """

    factor = None  # known once the file is read
    cache = True

    def __init__(self, ckpt: str, sha256: str | None = None, cache_dir: str | None = None):
        super().__init__()
        from diffx import vae

        with torch.device("cpu"):  # a real load even when the model is being built on the meta device
            found = vae.load(ckpt)
        if sha256 is not None and found.sha256 != sha256:
            raise DiffxError(f"latent.ckpt={ckpt}: this VAE file (sha256 {found.sha256[:12]}...) is not the one the "
                             f"model was trained with (sha256 {sha256[:12]}...); pass that VAE file")
        self.autoencoder, self.sha256, self.cache_dir = found.autoencoder, found.sha256, cache_dir
        self.scale, self.shift = found.scale, found.shift
        self.factor, self.latent_channels = found.autoencoder.factor, found.autoencoder.latent_channels

    def channels(self, data_channels: int) -> int:
        return self.latent_channels

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        mean, _ = self.autoencoder.encode(x)
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        return self.autoencoder.decode(x0 / self.scale + self.shift).clamp(-1, 1)

    def record(self) -> dict:
        return {"sha256": self.sha256}

    def fingerprint(self) -> str:
        return self.sha256


class DiffusersVAE(Latent):
    """A diffusers ``AutoencoderKL`` saved in a local folder (SD 1.x/2.x: 4 channels; SD3 / Flux: 16),
    with its own ``scaling_factor`` and ``shift_factor``: ``x0 = (mean - shift) * scale``. Needs the
    ``vae`` extra (``pip install 'diffx[vae]'``); only safetensors weights are read, never a pickle.
    """

    factor = None
    cache = True

    def __init__(self, path: str, subfolder: str = "", sha256: str | None = None, cache_dir: str | None = None):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise DiffxError("latent=diffusers_vae needs the diffusers package: pip install 'diffx[vae]'") from None
        folder = Path(path).expanduser() / subfolder
        weights = sorted(folder.glob("*.safetensors"))
        if not (folder / "config.json").is_file() or not weights:
            raise DiffxError(f"latent.path={path}: expected a diffusers AutoencoderKL folder (config.json and "
                             "safetensors weights)")
        try:
            with torch.device("cpu"):
                self.autoencoder = AutoencoderKL.from_pretrained(str(folder), local_files_only=True,
                                                                 use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise DiffxError(f"latent.path={path}: not a loadable AutoencoderKL ({str(e).splitlines()[0]})") from None
        self.autoencoder.eval().requires_grad_(False)
        self.sha256 = _sha256(weights)
        if sha256 is not None and self.sha256 != sha256:
            raise DiffxError(f"latent.path={path}: these VAE weights (sha256 {self.sha256[:12]}...) are not the ones "
                             f"the model was trained with (sha256 {sha256[:12]}...)")
        config = self.autoencoder.config
        self.scale, self.shift = float(config.scaling_factor), float(config.shift_factor or 0.0)
        self.factor, self.latent_channels = 2 ** (len(config.block_out_channels) - 1), int(config.latent_channels)
        self.cache_dir = cache_dir

    def channels(self, data_channels: int) -> int:
        return self.latent_channels

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        mean = self.autoencoder.encode(x).latent_dist.mode()
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        return self.autoencoder.decode(x0 / self.scale + self.shift).sample.clamp(-1, 1)

    def record(self) -> dict:
        return {"sha256": self.sha256}

    def fingerprint(self) -> str:
        return self.sha256


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Encoded(torch.utils.data.Dataset):
    """A training set with its images replaced by their encodings ``x0``, computed once (``cache``)."""

    def __init__(self, dataset, x0: Tensor):
        self.dataset, self.x0 = dataset, x0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "x": self.x0[i]}


@torch.no_grad()
def encode_once(latent: Latent, dataset, device, batch_size: int = 64) -> Encoded:
    """Encode every image of ``dataset`` with ``latent`` in batches on ``device``; kept on the CPU.

    When both the latent and the data have a fingerprint, the encodings are also kept on disk under
    ``latent.cache_dir`` (default ``~/.cache/diffx/latents``), keyed by the two, and a later run on
    the same data with the same encoder reads them back instead of encoding again."""
    keys = latent.fingerprint(), getattr(dataset, "fingerprint", lambda: None)()
    path = None
    if None not in keys:
        root = Path(getattr(latent, "cache_dir", None) or CACHE_DIR).expanduser()
        path = root / f"{keys[0][:16]}-{keys[1][:16]}.safetensors"
        try:
            x0 = load_file(str(path))["x0"] if path.is_file() else None
        except Exception:  # noqa: BLE001 -- an unreadable cache is only a cache: encode again
            x0 = None
        if x0 is not None and len(x0) == len(dataset):
            return Encoded(dataset, x0)
    n, rows = len(dataset), []
    with work(f"encoding {n} images into the latent space", n) as advance:
        for lo in range(0, n, batch_size):
            x = torch.stack([dataset[i]["x"] for i in range(lo, min(lo + batch_size, n))]).to(device)
            rows.append(latent.encode(x).float().cpu())
            advance(len(x))
    x0 = torch.cat(rows)
    if path is not None:
        atomic_write(path, lambda tmp: save_file({"x0": x0.contiguous()}, str(tmp)))
    return Encoded(dataset, x0)
