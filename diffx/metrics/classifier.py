"""A small CNN classifier of a labelled training set: how often a class-conditional model's samples are
recognised as the class they were asked for, and a feature space for a Frechet distance of its own.

Trained by diffx on the real training images (a fixed 80% of them; the other 20% measure its own
accuracy, reported beside every score so a reader knows what the judge is worth) and cached as
safetensors under ``cache_dir/<key>`` where the key hashes the data config, the architecture and the
training recipe: a second evaluation of the same data reuses it. For ``data=digits`` this is the digit
classifier of ``metrics=[class_accuracy, fd_classifier]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffx.atomic import atomic_write
from diffx.errors import DiffxError

# Bump when the architecture or the recipe changes, so that cached classifiers are not reused.
VERSION = 1
RECIPE = {"epochs": 15, "batch_size": 64, "lr": 2e-3, "heldout": 0.2, "seed": 0, "max_images": 10_000, "width": 32}


class SmallCNN(nn.Module):
    """conv3x3 x2 -> pool -> conv3x3 x2 -> global average: a ``2 * width``-d feature, then a linear head."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 2w)
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], diffx's data range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


class Classifier:
    """A trained ``SmallCNN`` over uint8 images (N, H, W, C): ``predict`` -> labels (N,),
    ``__call__`` -> features (N, 2 * width); ``heldout_accuracy`` on real images it never saw."""

    def __init__(self, net: SmallCNN, key: str, heldout_accuracy: float, class_names: list[str]):
        self.net, self.heldout_accuracy, self.class_names = net.eval(), heldout_accuracy, class_names
        self.id = f"classifier-{key}"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        return torch.cat([self.net.features(_to_input(images[lo: lo + 256])) for lo in range(0, len(images), 256)]).numpy()

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self.net(_to_input(images[lo: lo + 256])).argmax(1).numpy()
                               for lo in range(0, len(images), 256)])


def real_images(data, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` training images as uint8 (N, H, W, C) and their labels (N,), a fixed seeded pick."""
    dataset = data.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit].tolist()
    items = [dataset[i] for i in order]
    x = torch.stack([it["x"] for it in items])  # (N, C, H, W) in [-1, 1]
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, np.array([it["label"] for it in items])


def classifier(data_cfg: dict, data, cache_dir: str | Path | None = None) -> Classifier:
    """The classifier of this data: loaded from the cache, or trained on it now and cached."""
    if data.num_classes < 2:
        raise DiffxError("metrics class_accuracy and fd_classifier need class-labelled training data "
                         "(data=digits, data=shapes, a labelled imagefolder ...)")
    key = hashlib.sha256(json.dumps({"data": data_cfg, "version": VERSION, "recipe": RECIPE},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    file = Path(cache_dir or "~/.cache/diffx/classifier").expanduser() / f"{key}.safetensors"
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's global RNG left as it was
        torch.manual_seed(RECIPE["seed"])
        net = SmallCNN(data.channels, data.num_classes, RECIPE["width"])
    if file.is_file():
        from safetensors import safe_open
        with safe_open(str(file), "pt") as f:
            accuracy = float(f.metadata()["heldout_accuracy"])
        net.load_state_dict(load_file(str(file)))
        return Classifier(net, key, accuracy, list(data.class_names))
    images, labels = real_images(data, RECIPE["max_images"])
    with torch.random.fork_rng(devices=[]):
        accuracy = _fit(net, images, labels)
    file.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(file, lambda tmp: save_file(weights, str(tmp), metadata={
        "heldout_accuracy": str(accuracy), "data": json.dumps(data_cfg, default=str), "recipe": json.dumps(RECIPE)}))
    return Classifier(net, key, accuracy, list(data.class_names))


@torch.enable_grad()  # also when asked for inside an evaluation's no_grad
def _fit(net: SmallCNN, images: np.ndarray, labels: np.ndarray) -> float:
    """AdamW with a cosine decay on the first 80% (with random 1-pixel shifts, so samples a pixel off
    still read), accuracy on the last 20%."""
    torch.manual_seed(RECIPE["seed"] + 1)
    cut = int(len(images) * (1 - RECIPE["heldout"]))
    x, y = _to_input(images), torch.from_numpy(labels).long()
    steps = RECIPE["epochs"] * max(1, cut // RECIPE["batch_size"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=RECIPE["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    net.train()
    for step in range(steps):
        pick = torch.randint(cut, (RECIPE["batch_size"],))
        dx, dy = torch.randint(-1, 2, (2,)).tolist()
        batch = torch.roll(x[pick], shifts=(dy, dx), dims=(2, 3))
        loss = nn.functional.cross_entropy(net(batch), y[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    with torch.inference_mode():
        return float((net(x[cut:]).argmax(1) == y[cut:]).float().mean())
