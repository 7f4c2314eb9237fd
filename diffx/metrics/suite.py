"""The metrics of ``metrics=[...]`` over one set of generated samples.

For each guidance scale, ``n`` images are drawn with the conditions of ``n`` training images (a fixed
seeded pick: the labels or captions in their training proportions, nothing for an unconditional
model), so the generated set and the reference set come from the same conditional mix. Each metric is
a function of those samples (``METRICS``); features are computed once per network and shared (FID and
KID share one Inception pass), reference features come from ``diffx.metrics.reference``'s cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from diffx.errors import DiffxError
from diffx.generate import Request, generate
from diffx.metrics import classifier as classifiers
from diffx.metrics import fid as distances
from diffx.metrics import reference
from diffx.metrics.inception import Inception


@dataclass
class Options:
    samples: int = 500            # generated images per guidance scale
    reference_images: int = 2000  # real training images of the reference features
    kid_subset_size: int = 1000   # KID's subset size (Binkowski et al. use 1000), capped by both set sizes
    kid_subsets: int = 100
    cache_dir: str | None = None  # null -> ~/.cache/diffx/{reference,classifier}
    batch_size: int = 64
    seed: int = 0


@dataclass
class Samples:
    """Generated uint8 images (N, H, W, C), the class each was asked for (-1: none), and how to reach
    the real data they are compared with."""

    images: np.ndarray
    labels: np.ndarray
    data_cfg: dict
    load_data: callable           # () -> ImageData, called only when a reference must be computed
    options: Options
    device: torch.device
    _features: dict = field(default_factory=dict)

    def features(self, network) -> np.ndarray:
        if network.id not in self._features:
            self._features[network.id] = network(self.images)
        return self._features[network.id]

    def reference(self, network) -> np.ndarray:
        return reference.features(self.data_cfg, self.load_data, network, self.options.reference_images,
                                  _sub(self.options.cache_dir, "reference"))

    @functools.cached_property
    def classifier(self) -> classifiers.Classifier:
        """The data's classifier, loaded (or trained) once for every metric that needs it."""
        return classifiers.classifier(self.data_cfg, self.load_data(), _sub(self.options.cache_dir, "classifier"))


def _sub(cache_dir, name):
    return None if cache_dir is None else f"{cache_dir}/{name}"


def fid(s: Samples) -> dict:
    """FID (Heusel et al. 2017) against the training data's TF-Inception features."""
    net = Inception(s.device)
    gen, ref = s.features(net), s.reference(net)
    return {"fid": distances.fd(gen, ref), "reference_n": len(ref)}


def kid(s: Samples) -> dict:
    """KID (Binkowski et al. 2018), mean and standard deviation over subsets."""
    net = Inception(s.device)
    gen, ref = s.features(net), s.reference(net)
    mean, std = distances.kid(gen, ref, s.options.kid_subsets, s.options.kid_subset_size, s.options.seed)
    return {"kid": mean, "kid_std": std, "kid_subset_size": min(s.options.kid_subset_size, len(gen), len(ref)),
            "reference_n": len(ref)}


def class_accuracy(s: Samples) -> dict:
    """The fraction of samples the data's classifier reads as the class they were asked for, overall
    and per class, beside the classifier's own accuracy on real images it never saw."""
    clf = s.classifier
    right = clf.predict(s.images) == s.labels
    per_class = {name: float(right[s.labels == k].mean()) for k, name in enumerate(clf.class_names) if (s.labels == k).any()}
    return {"class_accuracy": float(right.mean()), "per_class": per_class,
            "classifier_heldout_accuracy": clf.heldout_accuracy}


def fd_classifier(s: Samples) -> dict:
    """Frechet distance in the classifier's feature space (for data=digits: the digit classifier's)."""
    clf = s.classifier
    gen = s.features(clf)
    ref = reference.features(s.data_cfg, s.load_data, clf, len(s.load_data().dataset),
                             _sub(s.options.cache_dir, "reference"))
    return {"fd_classifier": distances.fd(gen, ref), "fd_classifier_reference_n": len(ref)}


METRICS = {"fid": fid, "kid": kid, "class_accuracy": class_accuracy, "fd_classifier": fd_classifier}


def conditions(condition, data, n: int, seed: int) -> tuple[list, np.ndarray]:
    """The inputs of ``n`` generated images and their target classes: those of ``n`` training images
    (a seeded pick, cycled if the data has fewer)."""
    dataset = data.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [order[i % len(order)] for i in range(n)]
    labels = np.array([int(dataset.labels[r]) for r in rows])
    if condition.tells is None:
        return [None] * n, labels
    names = data.class_names
    inputs = [condition.input_for(dataset.captions[r], names[labels[i]] if labels[i] >= 0 else "")
              for i, r in enumerate(rows)]
    return inputs, labels


@torch.no_grad()
def evaluate(names: list[str], parts, plan, data_cfg: dict, load_data, scales: list[float], options: Options,
             device, guidance: dict | None = None, model=None, on_images=None) -> list[dict]:
    """One row per guidance scale: ``{"cfg", "n", <each metric's values>}``; ``model`` replaces the
    parts' model (the EMA weights during training); ``on_images(scale, images)`` sees each set."""
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise DiffxError(f"metrics: unknown {unknown[0]!r}; expected any of {', '.join(METRICS)}")
    if options.samples < 2:
        raise DiffxError(f"quality.samples={options.samples}: expected at least 2 (a covariance needs them)")
    load_data = functools.lru_cache(maxsize=1)(load_data)
    parts = replace(parts, model=model) if model is not None else parts
    inputs, labels = conditions(parts.condition, load_data(), options.samples, options.seed)
    seeds = [options.seed + i for i in range(options.samples)]
    rows = []
    for scale in scales:
        images, _ = generate(parts, plan, Request(seeds, inputs, None, scale, **(guidance or {})), options.batch_size,
                             device)
        if on_images is not None:
            on_images(scale, images)
        samples = Samples(images, labels, data_cfg, load_data, options, torch.device(device))
        row = {"cfg": scale, "n": len(images)}
        for name in names:
            row.update(METRICS[name](samples))
        rows.append(row)
    return rows


TRAINING_STEPS = 20  # DPM-Solver++(2M) steps of the evaluation during training, as the preview grids


def during_training(names: list[str], parts, ema_model, data_cfg: dict, data, options: Options, scale: float,
                    device, grid_path=None) -> dict:
    """``train.eval_every``: the metrics of the EMA weights as flat ``eval/<name>`` numbers for the log,
    with the evaluated images as a grid at ``grid_path``."""
    from diffx import grids
    from diffx.images import grid, save_png
    from diffx.samplers import multistep
    from diffx.samplers import plan as plans

    plan = plans.make(multistep.dpmpp, grids.uniform, TRAINING_STEPS, parts.objective.schedule)
    save = None if grid_path is None else (
        lambda _, images: save_png(grid_path, grid(images[:64], upscale=max(1, 128 // parts.spec.image_size))))
    row = evaluate(names, parts, plan, data_cfg, lambda: data, [scale], options, device, model=ema_model,
                   on_images=save)[0]
    return {f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "cfg"}
