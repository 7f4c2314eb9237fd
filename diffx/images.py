"""Images out: tensors in [-1, 1] -> uint8 arrays -> PNG files (with settings in text chunks) and grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from diffx.atomic import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(path: Path, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write one PNG atomically, with ``text`` as tEXt chunks (readable with ``PIL.Image.open(p).text``)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    atomic_write(Path(path), lambda tmp: pil.save(tmp, format="PNG", pnginfo=info))


def grid(images: np.ndarray, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """(B, H, W, C) -> one near-square mosaic (H', W', C), optionally upscaled by pixel repetition."""
    b, h, w, c = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return out.repeat(upscale, 0).repeat(upscale, 1) if upscale > 1 else out
