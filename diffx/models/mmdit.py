"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, sec. 4),
with adaLN-Zero conditioning from DiT (Peebles & Xie 2023) and optional Flux-style single-stream
blocks (Black Forest Labs 2024) after the double-stream ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffx.errors import DiffxError
from diffx.models.layers import (
    LabelEmbedder,
    Mlp,
    RMSNorm,
    TimestepEmbedder,
    ada_ln,
    attention,
    conditioning_vector,
    merge_heads,
    modulate,
    sincos_2d,
    split_heads,
)


class StreamWeights(nn.Module):
    """One modality's own weights inside a double-stream block: norms, adaLN, QKV, QK-norm, output
    projection and MLP. SD3 keeps these separate per modality; only the attention is joint.

    ``pre_only``: the stream's output after this block is never read (the context stream in the last
    block when no single-stream blocks follow), so it only provides keys and values (SD3's
    ``context_pre_only``) and owns no query, output projection or MLP that would never get a gradient.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = ada_ln(width, 2 if pre_only else 6)
        self.to_kv = nn.Linear(width, 2 * width)
        self.k_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        if not pre_only:
            self.to_q = nn.Linear(width, width)
            self.q_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(width, int(width * mlp_ratio))

    def project(self, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor, Tensor, tuple[Tensor, ...]]:
        """x (B, N, D), c (B, D) -> q (None when pre_only), k, v each (B, H, N, Dh), and the rest of
        the modulation vectors for ``residual``."""
        mod = self.ada(c).chunk(2 if self.pre_only else 6, dim=-1)
        h = modulate(self.norm1(x), mod[0], mod[1])
        k, v = (split_heads(y, self.heads) for y in self.to_kv(h).chunk(2, dim=-1))
        q = None if self.pre_only else self.q_norm(split_heads(self.to_q(h), self.heads))
        return q, self.k_norm(k), v, mod[2:]

    def residual(self, x: Tensor, attn: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        """Gated attention and MLP residuals; attn (B, N, D) is this stream's slice of the joint output."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa[:, None] * self.proj(attn)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DoubleStreamBlock(nn.Module):
    """SD3's MM-DiT block (Esser et al. 2024, fig. 2b): per-modality weights, one joint attention over
    the concatenated [context, image] sequence."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, context_pre_only: bool):
        super().__init__()
        self.image = StreamWeights(width, heads, mlp_ratio, qk_norm)
        self.context = StreamWeights(width, heads, mlp_ratio, qk_norm, pre_only=context_pre_only)

    def forward(self, x: Tensor, ctx: Tensor, c: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        q_img, k_img, v_img, mod_img = self.image.project(x, c)
        q_ctx, k_ctx, v_ctx, mod_ctx = self.context.project(ctx, c)
        k, v = torch.cat([k_ctx, k_img], dim=2), torch.cat([v_ctx, v_img], dim=2)  # (B, H, L+N, Dh)
        # A pre-only context stream asks no queries: only the image tokens attend.
        q = q_img if q_ctx is None else torch.cat([q_ctx, q_img], dim=2)  # (B, H, [L+]N, Dh)
        key_mask = torch.cat([mask, mask.new_ones(x.shape[:2])], dim=1)  # (B, L+N)
        out = merge_heads(attention(q, k, v, key_mask))  # (B, [L+]N, D)
        x = self.image.residual(x, out[:, -x.shape[1]:], mod_img)
        if q_ctx is not None:
            ctx = self.context.residual(ctx, out[:, : ctx.shape[1]], mod_ctx)
        return x, ctx


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block: shared weights over the concatenated tokens, with attention and
    MLP computed in parallel from one fused input projection, and one adaLN-Zero gate."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.heads, self.width, self.hidden = heads, width, int(width * mlp_ratio)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = ada_ln(width, 3)
        self.fused_in = nn.Linear(width, 3 * width + self.hidden)  # -> q, k, v, MLP hidden
        self.q_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        self.fused_out = nn.Linear(width + self.hidden, width)  # [attention, MLP] -> width

    def forward(self, h: Tensor, c: Tensor, mask: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        qkv, mlp = self.fused_in(modulate(self.norm(h), shift, scale)).split([3 * self.width, self.hidden], -1)
        q, k, v = (split_heads(y, self.heads) for y in qkv.chunk(3, dim=-1))  # each (B, H, L+N, Dh)
        attn = merge_heads(attention(self.q_norm(q), self.k_norm(k), v, mask))  # (B, L+N, D)
        out = self.fused_out(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return h + gate[:, None] * out


class FinalLayer(nn.Module):
    """adaLN + zero-initialised linear to patch pixels, so the untrained model predicts 0 (DiT)."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = ada_ln(width, 2)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(nn.Module):
    """SD3-style MMDiT: ``forward(x, t, cond) -> like x``.

    The image stream is the patchified input plus a fixed 2D sin-cos position embedding. The context
    stream is one learned register token, then one label token (when num_classes > 0), then the
    projected text tokens (when text_dim > 0); the register keeps joint attention well defined for
    unconditional models and for the null text condition. The adaLN conditioning vector c is the
    timestep embedding plus the label embedding and the projected pooled text.

    ``checkpointing``: in training mode, keep only each block's inputs and recompute the block during
    backward (Chen et al. 2016), trading one more forward for the activations (the attention's
    included). The weights and their names are the same either way.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int = 0,
        text_dim: int = 0,
        pooled_dim: int = 0,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        single_blocks: int = 0,
        checkpointing: bool = False,
    ):
        super().__init__()
        _check(image_size, patch_size, width, heads, depth)
        self.checkpointing = checkpointing
        self.in_channels, self.patch_size = in_channels, patch_size
        self.grid = image_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        # Fixed, not learned, and rebuilt from the shape, so it is not saved with the weights.
        self.register_buffer("pos_embed", sincos_2d(width, self.grid)[None], persistent=False)  # (1, N, D)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.ModuleDict()
        if num_classes:
            self.cond_embed["label"] = LabelEmbedder(num_classes, width)
        if pooled_dim:
            self.cond_embed["pooled"] = nn.Sequential(nn.Linear(pooled_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.register = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.context_embed = nn.Linear(text_dim, width) if text_dim else None

        self.joint_blocks = nn.ModuleList(
            DoubleStreamBlock(width, heads, mlp_ratio, qk_norm, context_pre_only=(i == depth - 1 and not single_blocks))
            for i in range(depth)
        )
        self.single_stream = nn.ModuleList(SingleStreamBlock(width, heads, mlp_ratio, qk_norm) for _ in range(single_blocks))
        self.final = FinalLayer(width, patch_size, in_channels)

    def context_tokens(self, cond: dict | None, batch: int) -> tuple[Tensor, Tensor]:
        """The context stream (B, L, D) and its key mask (B, L), True = real token."""
        tokens = [self.register.expand(batch, -1, -1)]
        if "label" in self.cond_embed and cond is not None and "label" in cond:
            tokens.append(self.cond_embed["label"](cond["label"])[:, None])  # (B, 1, D)
        mask = [torch.ones(batch, len(tokens), dtype=torch.bool, device=self.register.device)]
        if self.context_embed is not None and cond is not None and "tokens" in cond:
            text = cond["tokens"]
            tokens.append(self.context_embed(text))
            text_mask = cond.get("mask")
            mask.append(text.new_ones(text.shape[:2], dtype=torch.bool) if text_mask is None else text_mask.bool())
        # Under autocast the register is float32 and the projections bf16; agree on the latter.
        dtype = tokens[-1].dtype
        return torch.cat([tok.to(dtype) for tok in tokens], dim=1), torch.cat(mask, dim=1)

    def patchify(self, x: Tensor) -> Tensor:
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, D, g, g) -> (B, g*g, D)

    def unpatchify(self, x: Tensor) -> Tensor:
        b, p, g, C = x.shape[0], self.patch_size, self.grid, self.in_channels
        x = x.reshape(b, g, g, p, p, C)  # (B, g*g, p*p*C) -> (B, gh, gw, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, C, g * p, g * p)  # -> (B, C, H, W)

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        c = conditioning_vector(self.cond_embed, cond, self.time_embed(t))  # (B, D)
        img = self.patchify(x)  # (B, N, D)
        ctx, mask = self.context_tokens(cond, x.shape[0])  # (B, L, D), (B, L)
        for block in self.joint_blocks:
            img, ctx = self._block(block, img, ctx, c, mask)
        L = ctx.shape[1]
        h = torch.cat([ctx, img.to(ctx.dtype)], dim=1)  # (B, L+N, D); a no-op path when single_blocks=0
        full_mask = torch.cat([mask, mask.new_ones(img.shape[:2])], dim=1)
        for block in self.single_stream:
            h = self._block(block, h, c, full_mask)
        img = h[:, L:]
        return self.unpatchify(self.final(img, c))

    def _block(self, block: nn.Module, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _check(image_size: int, patch_size: int, width: int, heads: int, depth: int) -> None:
    """Reject shape combinations that would only fail deep inside forward()."""
    if patch_size < 1 or image_size % patch_size:
        raise DiffxError(
            f"model.patch_size={patch_size} does not divide image_size={image_size} (data.size, or the "
            "latent size); choose a patch_size that divides it"
        )
    if width % heads:
        raise DiffxError(f"model.heads={heads} does not divide model.width={width}; choose heads that divide it")
    if width % 4:
        raise DiffxError(
            f"model.width={width} must be divisible by 4 for the 2D sin-cos position embedding; round it"
        )
    if depth < 1:
        raise DiffxError(f"model.depth={depth} must be at least 1 (double-stream blocks)")
