"""Blocks shared by the UNet and the MMDiT: timestep and label embeddings, attention, adaLN, norms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffx.errors import DiffxError
from diffx.models import fused


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (Vaswani et al. 2017; DDPM, Ho et al. 2020): (B,) -> (B, dim).

    t is scaled by 1000 so the frequencies span the same range as for DDPM's integer steps.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    # An odd dim gets one zero column so the output is exactly `dim` wide.
    return F.pad(emb, (0, dim % 2))


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Fixed sin-cos embedding of positions (N,) -> (N, dim) (Vaswani et al. 2017)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """2D sin-cos position embedding of a grid x grid patch grid -> (grid*grid, dim), row-major;
    half the channels encode the row, half the column (MAE, He et al. 2022; DiT)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1).float()


def rope_2d(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """2-D rotary position embedding (RoPE, Su et al. 2021; 2-D as in Flux, Black Forest Labs 2024)
    of a grid x grid token grid, row-major: (cos, sin) each (grid*grid, head_dim). Half of each head's
    channels rotate with the row index, half with the column; channel pairs (2i, 2i+1) share an angle."""
    quarter = head_dim // 4
    omega = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (Dh/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega], dim=1)  # (N, Dh/2)
    angles = angles.repeat_interleave(2, dim=1)  # (N, Dh): one angle per channel pair
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate each channel pair (x_2i, x_2i+1) of x (B, H, N, Dh) by its angle: x cos + rot(x) sin,
    rot(x)_(2i, 2i+1) = (-x_2i+1, x_2i). Relative: q_m . k_n then depends on m - n only."""
    cos, sin = (r.to(x.dtype) for r in rope)
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, N, Dh/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (B, H, N, Dh)
    return x * cos + rotated * sin


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features -> MLP, as in DiT (Peebles & Xie 2023)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        # Under autocast the Linear casts the float32 features itself.
        return self.mlp(timestep_embedding(t, self.freq_dim))


class GuidanceEmbedder(nn.Module):
    """Guidance scale w -> sinusoidal features -> MLP, for a guided-distilled student that takes w as an
    input (Meng et al. 2023, sec. 4.1) instead of running an unconditional pass. The last layer starts
    at zero, so a student built from its teacher's weights starts as exactly the teacher."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, w: Tensor) -> Tensor:
        # w / 1000: timestep_embedding scales by 1000 (for t in [0, 1]); w lives on [1, 10] or so
        return self.mlp(timestep_embedding(w / 1000.0, self.freq_dim, max_period=100.0))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with one extra learned row for the null label -1 (classifier-free
    guidance, Ho & Salimans 2022): the null condition is a learned embedding, not a zero vector."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, label: Tensor) -> Tensor:
        null = torch.full_like(label, self.num_classes)
        return self.table(torch.where(label < 0, null, label))


def conditioning_vector(embedders: nn.ModuleDict, cond: dict | None, base: Tensor) -> Tensor:
    """Sum ``base`` (the timestep embedding) and each present condition's embedding.

    ``embedders`` maps a cond key ("label", "pooled") to its module; keys the model was built
    without are absent, so a condition the model cannot use is ignored rather than an error.
    """
    for key, embed in embedders.items():
        if cond is not None and key in cond:
            base = base + embed(cond[key])
    return base


def modulate(norm: nn.LayerNorm, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: norm(x) * (1 + scale) + shift, x (B, N, D) normalised by ``norm`` (a LayerNorm without affine, whose
    eps it takes), then scaled and shifted per sample by (B, D) vectors. On a CPU one fused pass each way
    (``diffx.models.fused``), else the LayerNorm and one addcmul."""
    return fused.modulated_norm(x, shift, scale, norm.eps)


def ada_ln(dim: int, chunks: int) -> nn.Sequential:
    """The adaLN-Zero regression c -> `chunks` vectors of width `dim` (Peebles & Xie 2023, sec. 3.2).

    Zero-initialised so every gated residual branch starts as the identity.
    """
    linear = nn.Linear(dim, chunks * dim)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.SiLU(), linear)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), used per head on q and k (QK-norm, SD3 sec. 5.3.2).

    Computed in float32: under bf16 autocast the attention logits are what QK-norm protects.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = fused.rms_norm(x, self.weight, self.eps)  # a CPU kernel, one pass each way, where it applies
        if y is not None:
            return y
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays
        return _RMSNormFn.apply(x.to(dtype), self.weight.to(dtype), self.eps).to(x.dtype)


class _RMSNormFn(torch.autograd.Function):
    """y = x_hat * w, x_hat = x * r, r = (mean(x^2) + eps)^(-1/2) over the last dim, with its gradient
    written out: dx = r * (g_hat - x_hat * mean(g_hat * x_hat)), g_hat = dy * w; dw = sum(dy * x_hat) over
    all but the last dim. Autograd's own backward of the three-op forward was 1.5x slower on a CPU (the
    broadcast weight's gradient, reduced over a transposed (B, H, N, Dh) view, is most of it), and the
    MMDiT runs this on every q and k (README, "Training speed"; tests/test_models.py checks the gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])  # mean(x^2)
        r = torch.rsqrt(ms.add_(eps))
        x_hat = x * r
        ctx.save_for_backward(x_hat, r, w)
        return x_hat * w

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_hat, r, w = ctx.saved_tensors
        g_hat = dy * w
        mean = torch.linalg.vecdot(g_hat, x_hat, dim=-1).unsqueeze(-1).div_(x_hat.shape[-1])
        dx = torch.addcmul(g_hat, x_hat, mean, value=-1).mul_(r)
        dw = (dy * x_hat).sum(tuple(range(dy.dim() - 1))) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H * Dh) -> (B, H, N, Dh), the layout scaled_dot_product_attention wants."""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, Dh) -> (B, N, H * Dh)."""
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, has_key: bool = False) -> Tensor:
    """Scaled dot-product attention over (B, H, N, Dh) tensors; key_mask (B, Nk) is True for real keys.

    A query whose keys are all masked (e.g. the null text condition, an all-False mask) gets a zero
    output instead of the NaN that a softmax over nothing gives. ``has_key``: the caller guarantees a
    real key in every row (the MMDiT's register and image tokens), which skips that fix-up (a full-size
    multiply forward and backward, ~0.5% of an MMDiT training step on the CPU).
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    key_mask = key_mask.bool()
    if has_key:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    any_key = key_mask.any(dim=-1)  # (B,)
    # Unmask empty rows so the softmax is finite, then zero their output below.
    safe = key_mask | ~any_key[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None, None, :])  # mask (B, 1, 1, Nk)
    return out * any_key[:, None, None, None].to(out.dtype)


class Attention(nn.Module):
    """Multi-head attention, self- (context_dim=0) or cross-attention to a (B, L, context_dim) sequence."""

    def __init__(self, dim: int, heads: int, context_dim: int = 0, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k, v = (split_heads(y, self.heads) for y in self.to_kv(context).chunk(2, dim=-1))
        out = attention(self.q_norm(q), self.k_norm(k), v, key_mask)
        return self.proj(merge_heads(out))


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> Linear, as in DiT and SD3.

    ``approximate``: "tanh", the tanh approximation of GELU DiT and SD3 use (Hendrycks & Gimpel 2016,
    eq. 2), or "none", the exact x * Phi(x) with erf: the same function to < 5e-4 and, on a CPU, 2.3x faster
    forward and backward together (3x forward; PyTorch's tanh kernel is the slow part; README, "Training speed")."""

    def __init__(self, dim: int, hidden: int, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))

    def hidden(self, x: Tensor) -> Tensor:
        """gelu(fc1(x)), fc2's input; on a CPU the bias and the GELU are one fused pass each way (diffx.models.fused)."""
        return fused.linear_gelu(x, self.fc1.weight, self.fc1.bias, self.approximate)


def heads_for(width: int, heads: int | None, head_dim: int | None, where: str) -> int:
    """Number of heads for a `width`-wide attention: `head_dim` if set, else `heads`; DiffxError if
    neither divides the width. `where` names the layer for the message."""
    if head_dim:
        if width % head_dim:
            raise DiffxError(
                f"model.head_dim={head_dim} does not divide the width {width} {where}; "
                "choose a head_dim that divides every attention width"
            )
        return width // head_dim
    if not heads or width % heads:
        raise DiffxError(
            f"model.heads={heads} does not divide the width {width} {where}; "
            "choose heads that divide it (or set model.head_dim)"
        )
    return heads
