"""Config + what the data decides -> the parts of a diffusion model. Shared by train and sample.

The YAML says which classes and their hyperparameters; this code supplies the shapes (channels,
image size, number of classes) at instantiate time, so no shape is ever written in a config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

PARTS = ("model", "latent", "objective", "schedule", "data")


@dataclass(frozen=True)
class DataSpec:
    """What the data decides about the model's shape."""

    channels: int
    image_size: int
    num_classes: int = 0
    class_names: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, data) -> "DataSpec":
        return cls(data.channels, data.image_size, data.num_classes, tuple(data.class_names))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d


@dataclass
class Parts:
    model: object
    objective: object
    latent: object


def parts_config(cfg: DictConfig) -> dict:
    """The resolved sub-configs that rebuild the model (stored in the checkpoint's metadata)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in PARTS if k in cfg}


def build(parts: dict | DictConfig, spec: DataSpec) -> Parts:
    """Instantiate latent, schedule, objective and model; shapes come from ``spec``."""
    parts = OmegaConf.create(parts) if isinstance(parts, dict) else parts
    latent = instantiate(parts.latent)
    schedule = instantiate(parts.schedule)
    objective = instantiate(parts.objective, schedule=schedule)
    model = instantiate(
        parts.model,
        in_channels=latent.channels(spec.channels),
        image_size=spec.image_size // latent.factor,
        num_classes=spec.num_classes,
    )
    return Parts(model=model, objective=objective, latent=latent)
