"""Config + what the data decides -> the parts of a diffusion model. Shared by train and sample.

The YAML says which classes and their hyperparameters; this code supplies the shapes (channels,
image size, number of classes, text width) at instantiate time, so no shape is ever written in a config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffx import conditioning
from diffx.text import words

PARTS = ("model", "latent", "objective", "schedule", "data", "text_encoder")


@dataclass(frozen=True)
class DataSpec:
    """What the data decides about the model's shape."""

    channels: int
    image_size: int
    num_classes: int = 0
    class_names: tuple[str, ...] = field(default_factory=tuple)
    # The words of the training captions (sorted; empty when there are none or too many to keep), so
    # that sampling can say which words of a prompt an encoder trained from scratch never saw.
    vocabulary: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, data) -> "DataSpec":
        return cls(data.channels, data.image_size, data.num_classes, tuple(data.class_names),
                   vocabulary(getattr(data.dataset, "captions", None) or []))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"], d["vocabulary"] = list(self.class_names), list(self.vocabulary)
        return d


MAX_VOCABULARY = 20_000


def vocabulary(captions: list[str]) -> tuple[str, ...]:
    """The distinct words of ``captions`` (``diffx.text.words``), or none past ``MAX_VOCABULARY``."""
    found = set()
    for caption in dict.fromkeys(captions):  # the shapes data repeats a few hundred captions
        found.update(words(caption))
        if len(found) > MAX_VOCABULARY:
            return ()
    return tuple(sorted(found))


@dataclass
class Parts:
    """A model's parts, built for data of shape ``spec``."""

    model: object
    objective: object
    latent: object
    condition: conditioning.Source = field(default_factory=conditioning.Unconditional)
    spec: DataSpec | None = None

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the model denoises: the data's shape through the latent space."""
        return self.latent.shape(self.spec.channels, self.spec.image_size)


def parts_config(cfg: DictConfig) -> dict:
    """The resolved sub-configs that rebuild the model (stored in the checkpoint's metadata)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in PARTS if k in cfg}


def build(parts: dict | DictConfig, spec: DataSpec, latent=None) -> Parts:
    """Instantiate latent, schedule, objective, condition and model; shapes come from ``spec``.

    With a text encoder the model is text-conditioned (class labels are then not used) and wrapped
    with the encoder's trainable head; otherwise it takes the data's class labels, if any. ``latent``:
    an already built latent space to reuse (a VAE is read from its file once, not per build).
    """
    parts = OmegaConf.create(parts) if isinstance(parts, dict) else parts
    latent = instantiate(parts.latent) if latent is None else latent
    schedule = instantiate(parts.schedule)
    objective = instantiate(parts.objective, schedule=schedule)
    # `text_encoder=none` composes to an empty mapping; checkpoints older than text have no key.
    text_encoder = instantiate(parts.text_encoder) if parts.get("text_encoder") else None
    condition = conditioning.of(text_encoder, spec)
    channels, size, _ = latent.shape(spec.channels, spec.image_size)
    net = instantiate(parts.model, in_channels=channels, image_size=size, **condition.model_kwargs)
    return Parts(model=condition.wrap(net), objective=objective, latent=latent, condition=condition, spec=spec)
