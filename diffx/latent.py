"""Where diffusion happens: pixel space (``latent=none``) or a VAE's latent space (``latent=vae``).

A latent space maps data ``x`` (B, C, H, W) in [-1, 1] to ``x0`` for the objective and back, and
says how it changes shape, so the model's ``in_channels`` and ``image_size`` follow from the data.
"""

from __future__ import annotations

from torch import Tensor, nn


class Identity(nn.Module):
    """Pixel-space diffusion: ``x0`` is the image itself."""

    factor = 1  # spatial downsampling
    x0_range = (-1.0, 1.0)  # where x0 lives: samplers clip x0_hat to it (see samplers.Denoiser)

    def channels(self, data_channels: int) -> int:
        return data_channels

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z
