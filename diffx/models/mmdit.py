"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, sec. 4),
with adaLN-Zero conditioning from DiT (Peebles & Xie 2023), and as options: Flux-style single-stream
blocks (Black Forest Labs 2024) after the double-stream ones, SD3.5's MMDiT-X extra image-only
self-attention in the first blocks (``dual_attention_layers``, Stability AI 2024), and Flux's 2-D
rotary positions instead of the added sin-cos embedding (``pos=rope``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffx.errors import DiffxError
from diffx.models.fused import gated_residual
from diffx.models.layers import (
    GuidanceEmbedder,
    LabelEmbedder,
    Mlp,
    RMSNorm,
    TimestepEmbedder,
    ada_ln,
    apply_rope,
    attention,
    conditioning_vector,
    merge_heads,
    modulate,
    rope_2d,
    sincos_2d,
    split_heads,
)


class StreamWeights(nn.Module):
    """One modality's own weights inside a double-stream block: norms, adaLN, QKV, QK-norm, output
    projection and MLP. SD3 keeps these separate per modality; only the attention is joint.

    ``pre_only``: the stream's output after this block is never read (the context stream in the last
    block when no single-stream blocks follow), so it only provides keys and values (SD3's
    ``context_pre_only``) and owns no query, output projection or MLP that would never get a gradient.

    ``dual``: MMDiT-X (SD3.5 Medium): the image stream also attends to itself alone, with its own
    QKV, QK-norm, projection and three more adaLN vectors (shift, scale, gate); both attentions read
    the same block input and both gated outputs join the residual before the MLP.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False,
                 dual: bool = False, gelu_approximate: str = "tanh"):
        super().__init__()
        self.heads = heads
        self.pre_only, self.dual = pre_only, dual
        self.chunks = 2 if pre_only else 9 if dual else 6
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = ada_ln(width, self.chunks)
        self.to_kv = nn.Linear(width, 2 * width)
        self.k_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        if not pre_only:
            self.to_q = nn.Linear(width, width)
            self.q_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(width, int(width * mlp_ratio), gelu_approximate)
        if dual:
            self.to_qkv2 = nn.Linear(width, 3 * width)
            self.q_norm2 = RMSNorm(width // heads) if qk_norm else nn.Identity()
            self.k_norm2 = RMSNorm(width // heads) if qk_norm else nn.Identity()
            self.proj2 = nn.Linear(width, width)

    def project(self, x: Tensor, c: Tensor, rope=None) -> tuple[Tensor | None, Tensor, Tensor, tuple[Tensor, ...]]:
        """x (B, N, D), c (B, D) -> q (None when pre_only), k, v each (B, H, N, Dh), and the rest of
        the modulation vectors for ``residual`` (with a dual stream, its gated self-attention last).
        ``rope``: this stream's rotary (cos, sin), applied to q and k after QK-norm (Flux)."""
        mod = self.ada(c).chunk(self.chunks, dim=-1)
        h = modulate(self.norm1, x, mod[0], mod[1])
        k, v = (split_heads(y, self.heads) for y in self.to_kv(h).chunk(2, dim=-1))
        q = None if self.pre_only else self.q_norm(split_heads(self.to_q(h), self.heads))
        k = self.k_norm(k)
        if rope is not None:
            q, k = (None if q is None else apply_rope(q, rope)), apply_rope(k, rope)
        if not self.dual:
            return q, k, v, mod[2:]
        h2 = modulate(self.norm1, x, mod[6], mod[7])
        q2, k2, v2 = (split_heads(y, self.heads) for y in self.to_qkv2(h2).chunk(3, dim=-1))
        q2, k2 = self.q_norm2(q2), self.k_norm2(k2)
        if rope is not None:
            q2, k2 = apply_rope(q2, rope), apply_rope(k2, rope)
        alone = mod[8][:, None] * self.proj2(merge_heads(attention(q2, k2, v2)))  # (B, N, D)
        return q, k, v, (*mod[2:6], alone)

    def residual(self, x: Tensor, attn: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        """Gated attention and MLP residuals; attn (B, N, D) is this stream's slice of the joint output."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp, *alone = mod
        x = gated_residual(x, gate_msa, self.proj, attn)  # x + gate * proj(attn)
        if alone:
            x = x + alone[0]
        return gated_residual(x, gate_mlp, self.mlp.fc2, self.mlp.hidden(modulate(self.norm2, x, shift_mlp, scale_mlp)))


class DoubleStreamBlock(nn.Module):
    """SD3's MM-DiT block (Esser et al. 2024, fig. 2b): per-modality weights, one joint attention over
    the concatenated [context, image] sequence."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, context_pre_only: bool,
                 dual: bool = False, gelu_approximate: str = "tanh"):
        super().__init__()
        self.image = StreamWeights(width, heads, mlp_ratio, qk_norm, dual=dual, gelu_approximate=gelu_approximate)
        self.context = StreamWeights(width, heads, mlp_ratio, qk_norm, pre_only=context_pre_only,
                                     gelu_approximate=gelu_approximate)

    def forward(self, x: Tensor, ctx: Tensor, c: Tensor, mask: Tensor, rope=None) -> tuple[Tensor, Tensor]:
        # Rotary positions (pos=rope) are the image tokens'; context tokens sit at position 0 (no rotation).
        q_img, k_img, v_img, mod_img = self.image.project(x, c, rope)
        q_ctx, k_ctx, v_ctx, mod_ctx = self.context.project(ctx, c)
        k, v = torch.cat([k_ctx, k_img], dim=2), torch.cat([v_ctx, v_img], dim=2)  # (B, H, L+N, Dh)
        # A pre-only context stream asks no queries: only the image tokens attend.
        q = q_img if q_ctx is None else torch.cat([q_ctx, q_img], dim=2)  # (B, H, [L+]N, Dh)
        key_mask = torch.cat([mask, mask.new_ones(x.shape[:2])], dim=1)  # (B, L+N)
        out = attention(q, k, v, key_mask, has_key=True)  # (B, H, [L+]N, Dh); image keys are always real
        # Each stream merges its own slice of the heads: one copy each, not a merge and a sliced copy.
        x = self.image.residual(x, merge_heads(out[:, :, -x.shape[1]:]), mod_img)
        if q_ctx is not None:
            ctx = self.context.residual(ctx, merge_heads(out[:, :, : ctx.shape[1]]), mod_ctx)
        return x, ctx


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block: shared weights over the concatenated tokens, with attention and
    MLP computed in parallel from one fused input projection, and one adaLN-Zero gate."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, gelu_approximate: str = "tanh"):
        super().__init__()
        self.heads, self.width, self.hidden = heads, width, int(width * mlp_ratio)
        self.gelu_approximate = gelu_approximate
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = ada_ln(width, 3)
        self.fused_in = nn.Linear(width, 3 * width + self.hidden)  # -> q, k, v, MLP hidden
        self.q_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        self.fused_out = nn.Linear(width + self.hidden, width)  # [attention, MLP] -> width

    def forward(self, h: Tensor, c: Tensor, mask: Tensor, rope=None) -> Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        qkv, mlp = self.fused_in(modulate(self.norm, h, shift, scale)).split([3 * self.width, self.hidden], -1)
        q, k, v = (split_heads(y, self.heads) for y in qkv.chunk(3, dim=-1))  # each (B, H, L+N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotate the image tokens (the last N); the context ones sit at position 0
            n = rope[0].shape[0]
            q, k = (torch.cat([y[:, :, :-n], apply_rope(y[:, :, -n:], rope)], dim=2) for y in (q, k))
        attn = merge_heads(attention(q, k, v, mask, has_key=True))  # (B, L+N, D); the register is a real key
        out = torch.cat([attn, F.gelu(mlp, approximate=self.gelu_approximate)], dim=-1)
        return gated_residual(h, gate, self.fused_out, out)  # h + gate * fused_out(out)


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
        return self.linear(self.features(x, c))

    def features(self, x: Tensor, c: Tensor) -> Tensor:
        """The modulated tokens (B, N, D), the linear's input."""
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return modulate(self.norm, x, shift, scale)


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

    ``gelu_approximate``: the MLPs' GELU, ``tanh`` (SD3's approximation; what a config without the key, an
    older checkpoint's, builds) or ``none`` (exact, the ``model=mmdit*`` presets': 2.3x faster on a CPU).
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
        guidance_embed: bool = False,
        dual_attention_layers: int = 0,
        pos: str = "sincos",
        gelu_approximate: str = "tanh",
    ):
        super().__init__()
        _check(image_size, patch_size, width, heads, depth, dual_attention_layers, pos, gelu_approximate)
        self.checkpointing = checkpointing
        self.in_channels, self.patch_size = in_channels, patch_size
        self.grid = image_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        # Fixed, not learned, and rebuilt from the shape, so neither is saved with the weights: an added
        # sin-cos embedding (SD3, DiT), or rotary angles for q and k in every attention (pos=rope, Flux).
        rope = pos == "rope"
        self.register_buffer("pos_embed", None if rope else sincos_2d(width, self.grid)[None], persistent=False)
        cos, sin = rope_2d(width // heads, self.grid) if rope else (None, None)  # each (N, Dh)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.ModuleDict()
        if num_classes:
            self.cond_embed["label"] = LabelEmbedder(num_classes, width)
        if pooled_dim:
            self.cond_embed["pooled"] = nn.Sequential(nn.Linear(pooled_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.guidance_embed = guidance_embed  # a guided-distilled student: cond["w"], the scale, is an input
        if guidance_embed:
            self.cond_embed["w"] = GuidanceEmbedder(width)
        self.register = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.context_embed = nn.Linear(text_dim, width) if text_dim else None

        self.joint_blocks = nn.ModuleList(
            DoubleStreamBlock(width, heads, mlp_ratio, qk_norm, context_pre_only=(i == depth - 1 and not single_blocks),
                              dual=i < dual_attention_layers, gelu_approximate=gelu_approximate)
            for i in range(depth)
        )
        self.single_stream = nn.ModuleList(SingleStreamBlock(width, heads, mlp_ratio, qk_norm, gelu_approximate)
                                           for _ in range(single_blocks))
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
        # (B, D, g, g) -> (B, g*g, D), made contiguous once here: a transposed view would carry its layout
        # through every residual add, and each LayerNorm would then copy its input (~3% of a CPU forward).
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()
        return tokens if self.pos_embed is None else tokens + self.pos_embed

    def unpatchify(self, x: Tensor) -> Tensor:
        b, p, g, C = x.shape[0], self.patch_size, self.grid, self.in_channels
        x = x.reshape(b, g, g, p, p, C)  # (B, g*g, p*p*C) -> (B, gh, gw, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, C, g * p, g * p)  # -> (B, C, H, W)

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        return self.to_image(self.head(self.features(x, t, cond)))

    @property
    def head(self) -> nn.Linear:
        """The output layer, linear in its weights: FinalLayer's linear, a Bayesian last layer's place
        (``diffx.uncertainty``). ``forward = to_image(head(features(...)))``."""
        return self.final.linear

    def to_image(self, y: Tensor) -> Tensor:
        """The head's output (B, N, p*p*C) -> (B, C, H, W)."""
        return self.unpatchify(y)

    def features(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        """The head's input (B, N, D): the image tokens after the final adaLN modulation."""
        c = conditioning_vector(self.cond_embed, cond, self.time_embed(t))  # (B, D)
        img = self.patchify(x)  # (B, N, D)
        ctx, mask = self.context_tokens(cond, x.shape[0])  # (B, L, D), (B, L)
        rope = None if self.rope_cos is None else (self.rope_cos, self.rope_sin)
        for block in self.joint_blocks:
            img, ctx = self._block(block, img, ctx, c, mask, rope)
        L = ctx.shape[1]
        h = torch.cat([ctx, img.to(ctx.dtype)], dim=1)  # (B, L+N, D); a no-op path when single_blocks=0
        full_mask = torch.cat([mask, mask.new_ones(img.shape[:2])], dim=1)
        for block in self.single_stream:
            h = self._block(block, h, c, full_mask, rope)
        img = h[:, L:]
        return self.final.features(img, c)

    def _block(self, block: nn.Module, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _check(image_size: int, patch_size: int, width: int, heads: int, depth: int, dual: int = 0,
           pos: str = "sincos", gelu_approximate: str = "tanh") -> None:
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
    if not 0 <= dual <= depth:
        raise DiffxError(f"model.dual_attention_layers={dual}: expected 0..model.depth={depth}")
    if gelu_approximate not in ("tanh", "none"):
        raise DiffxError(f"model.gelu_approximate={gelu_approximate!r}: expected tanh (SD3's GELU) or none (exact GELU)")
    if pos not in ("sincos", "rope"):
        raise DiffxError(f"model.pos={pos!r}: expected sincos or rope")
    if pos == "rope" and (width // heads) % 4:
        raise DiffxError(f"model.pos=rope needs a head width (model.width / model.heads = {width // heads}) "
                         "divisible by 4")
