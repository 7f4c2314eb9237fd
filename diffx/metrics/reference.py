"""Features of the real training images under a feature network, cached on disk: the reference side
of FID, KID and the classifier's Frechet distance.

The cache file is ``cache_dir/<key>.safetensors`` with the key hashing the data config (what the
images are), the network's id (which includes its file's sha256 or the classifier's key) and the
number of images; it holds the features themselves (N, D) float32 -- KID needs them, not only their
mean and covariance -- and, in its metadata, what it was computed from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from diffx.atomic import atomic_write
from diffx.metrics.classifier import real_images


def key(data_cfg: dict, network_id: str, n: int) -> str:
    return hashlib.sha256(json.dumps({"data": data_cfg, "network": network_id, "n": n}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def features(data_cfg: dict, load_data, network, n: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """``network``'s features (N, D) of ``n`` training images (a fixed seeded pick; all if fewer):
    from the cache, or computed now (``load_data()`` builds the data only then) and cached."""
    file = Path(cache_dir or "~/.cache/diffx/reference").expanduser() / f"{key(data_cfg, network.id, n)}.safetensors"
    if file.is_file():
        return load_file(str(file))["features"]
    images, _ = real_images(load_data(), n)
    with torch.inference_mode():
        feats = np.ascontiguousarray(network(images), dtype=np.float32)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda tmp: save_file({"features": feats}, str(tmp), metadata={
        "data": json.dumps(data_cfg, default=str), "network": network.id, "n": str(len(feats))}))
    return feats
