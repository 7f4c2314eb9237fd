"""UNet denoiser: Ronneberger et al. 2015, as adapted for diffusion by Ho et al. 2020 (DDPM) and
Dhariwal & Nichol 2021 (ADM: scale-shift norm, class embedding), with the text cross-attention
transformer blocks of Rombach et al. 2022 (Stable Diffusion)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffx.errors import DiffxError
from diffx.models import fused
from diffx.models.layers import (Attention, GuidanceEmbedder, LabelEmbedder, TimestepEmbedder, conditioning_vector,
                                 heads_for, sincos_2d)
from diffx.models.upsample import Upsample


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts as the identity (DDPM, ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding enters as a per-channel scale and shift of the
    second norm (ADM's "scale-shift norm", Dhariwal & Nichol 2021, sec. 3)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # norm(h) * (1 + scale) + shift, in one pass
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text tokens (only when the model has text),
    and a feed-forward (Rombach et al. 2022, "BasicTransformerBlock")."""

    def __init__(self, dim: int, heads: int, context_dim: int, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, qk_norm=qk_norm)
        self.cross = nn.ModuleDict()
        if context_dim:
            self.cross["norm"] = nn.LayerNorm(dim)
            self.cross["attn"] = Attention(dim, heads, context_dim=context_dim, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        if "attn" in self.cross and context is not None:
            x = x + self.cross["attn"](self.cross["norm"](x), context, mask)
        # = x + ff(norm3(x)); on a CPU ff's bias and GELU are one fused pass each way (diffx.models.fused)
        return x + self.ff[2](fused.linear_gelu(self.norm3(x), self.ff[0].weight, self.ff[0].bias))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> TransformerBlock -> feature map, with a zero-initialised output
    projection so the block starts as the identity.

    ``res`` > 0 adds a fixed 2-D sin-cos position embedding (MAE; DiT) of the res x res map to the
    tokens, as ``diffx.models.mmdit`` does to its image tokens: without it a token knows where it is
    only through the zero padding of the convolutions around it. (On the shapes data it did not make a
    text UNet follow position words; see the README's "Text to image".)"""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int, res: int = 0, qk_norm: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.proj_in = nn.Linear(ch, ch)
        self.block = TransformerBlock(ch, heads, context_dim, qk_norm)
        self.proj_out = zero_init(nn.Linear(ch, ch))
        # Fixed and rebuilt from the shape, so not saved with the weights.
        self.register_buffer("pos", sincos_2d(ch, res)[None] if res else None, persistent=False)  # (1, H*W, C)

    def forward(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, H*W, C)
        if self.pos is not None:
            tokens = tokens + self.pos.to(tokens.dtype)
        tokens = self.proj_out(self.block(tokens, context, mask))
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)  # (B, H*W, C) -> (B, C, H, W)


class Stage(nn.Module):
    """One ResBlock, followed by a SpatialTransformer at the attention resolutions."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float,
                 heads: int | None, context_dim: int, pos_res: int = 0, qk_norm: bool = False):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, groups, dropout)
        self.attn = SpatialTransformer(out_ch, heads, context_dim, groups, pos_res, qk_norm) if heads else None

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context, mask)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (DDPM)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UNet(nn.Module):
    """Diffusion UNet with optional class and text conditioning: ``forward(x, t, cond) -> like x``.

    Levels run at image_size, image_size/2, ...; each holds ``num_res_blocks`` Stages, whose outputs
    are the skip connections that the decoder Stage at the same resolution concatenates. Attention
    (a SpatialTransformer) runs at the feature-map sizes listed in ``attn_resolutions`` and always in
    the middle block; sizes not reached at this image size are ignored, so one config serves several
    data sizes. Labels and pooled text add to the timestep embedding; text tokens enter through
    cross-attention.

    ``checkpointing``: in training mode, keep only each Stage's input (a ResBlock and its transformer
    block) and recompute the Stage's inside during backward (Chen et al. 2016), trading one more
    forward for the activations. The weights and their names are the same either way.

    ``channels_last``: the conv weights and the feature maps are kept in NHWC memory order, which
    oneDNN (CPU) and cuDNN (GPU) convolve without reordering; the values, the weight names and the
    output (returned in the usual NCHW order) are the same either way. Measured on one CPU core, the
    training step 1.05-1.15x faster (16x16 and 32x32, batch 32; README "Training speed against diffusers").
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int = 0,
        text_dim: int = 0,
        pooled_dim: int = 0,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (8,),
        heads: int | None = 4,
        head_dim: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 8,
        checkpointing: bool = False,
        guidance_embed: bool = False,
        pos_embed: bool = False,
        pooled_text: bool = True,
        qk_norm: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.checkpointing = checkpointing
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        widths = [channels * m for m in channel_mult]
        _check(image_size, channels, channel_mult, widths, norm_groups)
        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedder(emb_dim, freq_dim=channels)
        self.cond_embed = nn.ModuleDict()
        if num_classes:
            self.cond_embed["label"] = LabelEmbedder(num_classes, emb_dim)
        if pooled_dim and pooled_text:  # SD XL adds the pooled text to the timestep embedding; SD 1.x does not
            self.cond_embed["pooled"] = nn.Linear(pooled_dim, emb_dim)
        self.guidance_embed = guidance_embed  # a guided-distilled student: cond["w"], the scale, is an input
        if guidance_embed:
            self.cond_embed["w"] = GuidanceEmbedder(emb_dim, freq_dim=channels)

        def stage(in_ch: int, out_ch: int, res: int, attn: bool) -> Stage:
            n_heads = heads_for(out_ch, heads, head_dim, f"(UNet attention at {res}x{res})") if attn else None
            if attn and pos_embed and out_ch % 4:
                raise DiffxError(f"model.pos_embed=true needs attention widths divisible by 4; {out_ch} at {res}x{res} "
                                 "is not (change model.channels or model.channel_mult)")
            return Stage(in_ch, out_ch, emb_dim, norm_groups, dropout, n_heads, text_dim, res if pos_embed else 0,
                         qk_norm)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch, res, skips = channels, image_size, []
        for level, width in enumerate(widths):
            stages = nn.ModuleList()
            for _ in range(num_res_blocks):
                stages.append(stage(ch, width, res, res in attn_resolutions))
                ch = width
                skips.append(ch)
            self.down.append(stages)
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch))
            res = res if last else res // 2

        self.mid = nn.ModuleList([stage(ch, ch, res, True), stage(ch, ch, res, False)])

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            stages = nn.ModuleList()
            for _ in range(num_res_blocks):
                stages.append(stage(ch + skips.pop(), width, res, res in attn_resolutions))
                ch = width
            self.up.append(stages)
            self.upsample.append(Upsample(ch) if level > 0 else nn.Identity())
            res = res * 2 if level > 0 else res

        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))
        )
        self.to(memory_format=self.memory_format)  # the conv weights; load_state_dict keeps their layout

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        return self.to_image(self.head(self.features(x, t, cond)))

    @property
    def head(self) -> nn.Conv2d:
        """The output layer: the one layer linear in its weights that a Bayesian last layer is put on
        (``diffx.uncertainty``). ``forward = to_image(head(features(...)))``."""
        return self.out[-1]

    def to_image(self, y: Tensor) -> Tensor:
        """The head's output -> shaped like x: already so for the UNet (back in NCHW order)."""
        return y.contiguous()

    def features(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        """The head's input (B, channels, H, W): everything but the last conv."""
        emb = conditioning_vector(self.cond_embed, cond, self.time_embed(t))  # (B, 4 * channels)
        context = cond.get("tokens") if cond else None  # (B, L, text_dim)
        mask = cond.get("mask") if cond else None  # (B, L), True = real token

        h, skips = self.conv_in(x.contiguous(memory_format=self.memory_format)), []
        for stages, down in zip(self.down, self.downsample):
            for s in stages:
                h = self._stage(s, h, emb, context, mask)
                skips.append(h)
            h = down(h)
        for s in self.mid:
            h = self._stage(s, h, emb, context, mask)
        for stages, up in zip(self.up, self.upsample):
            for s in stages:
                h = self._stage(s, torch.cat([h, skips.pop()], dim=1), emb, context, mask)
            h = up(h)
        return self.out[:-1](h)  # GroupNorm, SiLU

    def _stage(self, stage: Stage, *args) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)


def _check(image_size: int, channels: int, channel_mult: tuple, widths: list[int], norm_groups: int) -> None:
    """Reject shape combinations that would only fail deep inside forward()."""
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise DiffxError(
            f"model.channel_mult={list(channel_mult)} has {len(channel_mult)} levels, so image_size "
            f"(data.size, or the latent size) must be divisible by {factor}, got {image_size}; "
            "use fewer levels or another data.size"
        )
    bad = [w for w in widths if w % norm_groups]
    if bad:
        raise DiffxError(
            f"model.norm_groups={norm_groups} does not divide the widths {bad} "
            f"(model.channels={channels} x model.channel_mult); choose norm_groups dividing every width"
        )
