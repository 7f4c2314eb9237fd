"""KL-regularised autoencoder, the image compressor of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3 and App. G; ldm's ``AutoencoderKL``, ``Encoder``,
``Decoder`` and ``DiagonalGaussianDistribution``).

The encoder maps an image (B, C, H, W) to the mean and log-variance of a diagonal Gaussian posterior
over a latent (B, latent_channels, H / f, W / f), f = 2^(levels - 1); the decoder maps a latent back to
an image. Each level is ResNet blocks (GroupNorm, SiLU, conv; no time embedding) then a stride-2 conv;
the middle holds one self-attention between two ResNet blocks; the decoder mirrors the encoder with one
more ResNet block per level and nearest-neighbour upsampling. A small KL term towards N(0, I) keeps the
latent space smooth without forcing it to be Gaussian (weight ~1e-6, App. G).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffx.errors import DiffxError
from diffx.models.layers import Attention
from diffx.models.unet import Downsample, zero_init
from diffx.models.upsample import Upsample

# ldm's DiagonalGaussianDistribution clamps log sigma^2 here, so exp() neither overflows nor underflows.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over the latent: (B, ...) -> (B,).

    ``0.5 * sum(mean^2 + sigma^2 - 1 - log sigma^2)`` (Kingma & Welling 2014, App. B); zero exactly
    when mean = 0 and logvar = 0.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice around a residual (ldm's ``ResnetBlock`` without the time embedding).
    The second conv starts at zero, so each block starts as its skip path."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class PixelAttention(nn.Module):
    """One-head self-attention over all pixels of a feature map (ldm's ``AttnBlock``), as a residual
    whose output projection starts at zero."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.attn = Attention(ch, heads=1)
        zero_init(self.attn.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)  # -> (B, C, H, W)


def _mid(ch: int, groups: int) -> list[nn.Module]:
    return [ResnetBlock(ch, ch, groups), PixelAttention(ch, groups), ResnetBlock(ch, ch, groups)]


def _out(ch: int, out_ch: int, groups: int) -> list[nn.Module]:
    return [nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1)]


class Encoder(nn.Sequential):
    """Image (B, C, H, W) -> (B, out_channels, H / f, W / f): per level ``num_res_blocks`` ResNet blocks,
    then a stride-2 conv (not after the last level); the middle block; norm, SiLU, conv."""

    def __init__(self, in_channels: int, widths: Sequence[int], num_res_blocks: int, out_channels: int, groups: int):
        layers, ch = [nn.Conv2d(in_channels, widths[0], 3, padding=1)], widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(ch, width, groups))
                ch = width
            if level < len(widths) - 1:
                layers.append(Downsample(ch))
        super().__init__(*layers, *_mid(ch, groups), *_out(ch, out_channels, groups))


class Decoder(nn.Sequential):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f), the encoder mirrored:
    the middle block, then per level from the deepest ``num_res_blocks + 1`` ResNet blocks and a
    nearest-neighbour upsampling (not after the first level); norm, SiLU, conv."""

    def __init__(self, latent_channels: int, widths: Sequence[int], num_res_blocks: int, out_channels: int,
                 groups: int):
        ch = widths[-1]
        layers = [nn.Conv2d(latent_channels, ch, 3, padding=1), *_mid(ch, groups)]
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(ch, width, groups))
                ch = width
            if level > 0:
                layers.append(Upsample(ch))
        super().__init__(*layers, *_out(ch, out_channels, groups))


class AutoencoderKL(nn.Module):
    """``encode(x) -> (mean, logvar)``, ``decode(z) -> x``, ``forward(x) -> (recon, mean, logvar)``.

    ``in_channels`` and ``image_size`` come from the data (code, not config). Level i is
    ``channels * channel_mult[i]`` wide; there are ``len(channel_mult) - 1`` halvings, so the
    downsampling factor is 2^(len(channel_mult) - 1): SD's kl-f8 has four levels.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        norm_groups: int = 8,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        _check(in_channels, image_size, channels, channel_mult, num_res_blocks, latent_channels, norm_groups)
        widths = [channels * m for m in channel_mult]
        self._factor, self._latent_channels = 2 ** (len(channel_mult) - 1), latent_channels
        # The encoder's output holds mean and log-variance side by side (ldm's double_z).
        self.encoder = Encoder(in_channels, widths, num_res_blocks, 2 * latent_channels, norm_groups)
        self.decoder = Decoder(latent_channels, widths, num_res_blocks, in_channels, norm_groups)

    @property
    def factor(self) -> int:
        """Spatial downsampling from image to latent."""
        return self._factor

    @property
    def latent_channels(self) -> int:
        return self._latent_channels

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image (B, C, H, W) in [-1, 1] -> posterior mean and log-variance, each (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, latent_channels, h, w) -> image (B, C, h * f, w * f), roughly in [-1, 1] (not clamped)."""
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw ``z = mean + sigma * eps`` (the reparameterisation trick, Kingma & Welling 2014), decode."""
        mean, logvar = self.encode(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar


def _check(in_channels: int, image_size: int, channels: int, channel_mult: tuple, num_res_blocks: int,
           latent_channels: int, norm_groups: int) -> None:
    """Reject shapes that would only fail deep inside forward(), naming the key."""
    if in_channels < 1 or image_size < 1:
        raise DiffxError(f"autoencoder: the data has {in_channels} channels of size {image_size}; expected both >= 1")
    if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult) or channels < 1:
        raise DiffxError(f"autoencoder.channel_mult={list(channel_mult)}, autoencoder.channels={channels}: "
                         "expected positive integers (one multiplier per level)")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise DiffxError(f"autoencoder.channel_mult={list(channel_mult)} has {len(channel_mult)} levels, so the "
                         f"image size must be divisible by the factor {factor}, got data.size={image_size}; "
                         "use fewer levels or another data.size")
    if num_res_blocks < 1:
        raise DiffxError(f"autoencoder.num_res_blocks={num_res_blocks}: expected at least 1")
    if latent_channels < 1:
        raise DiffxError(f"autoencoder.latent_channels={latent_channels}: expected at least 1")
    bad = [channels * m for m in channel_mult if norm_groups < 1 or (channels * m) % norm_groups]
    if bad:
        raise DiffxError(f"autoencoder.norm_groups={norm_groups} does not divide the widths {bad} "
                         f"(autoencoder.channels={channels} x autoencoder.channel_mult); choose norm_groups "
                         "dividing every width")
