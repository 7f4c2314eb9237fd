"""Where diffusion happens: pixel space (``latent=none``) or a learned latent space (``latent=vae``).

Every latent space implements ``Latent``: it maps data ``x`` (B, C, H, W) in [-1, 1] to ``x0`` for the
objective and back, and declares how it changes shape, so the model's ``in_channels`` and
``image_size`` follow from the data (diffx/build.py). With a VAE, ``x0`` is the *scaled* latent
``(encoding - shift) * scale`` (Rombach et al. 2022, sec. 4.3 and App. G: unit variance for the
diffusion), so the objective and samplers see data of the usual scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffx.progress import work


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
    """Encode every image of ``dataset`` with ``latent`` in batches on ``device``; kept on the CPU."""
    n = len(dataset)
    rows = []
    with work(f"encoding {n} images into the latent space", n) as advance:
        for lo in range(0, n, batch_size):
            x = torch.stack([dataset[i]["x"] for i in range(lo, min(lo + batch_size, n))]).to(device)
            rows.append(latent.encode(x).cpu())
            advance(len(x))
    return Encoded(dataset, torch.cat(rows))
