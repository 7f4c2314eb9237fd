"""The condition dict ``cond`` that every model takes, where it comes from, and its null counterpart.

``cond`` is None (unconditional) or a dict of batch-first tensors: ``{"label": (B,)}`` where label -1
is the null label, or a text encoder's features (diffx/text.py), which the model's text head turns
into ``{"tokens": (B, L, D), "mask": (B, L), "pooled": (B, D)}``.

A condition source (``Unconditional``, ``Labels``, ``Text``; ``of`` picks one from what the data and
the config provide) turns a data batch or user inputs into ``cond``, says what the null condition
is, and parses what a user asks for at sampling time (``label=``, ``prompt=``, ``prompt_file=``,
``negative_prompt=``) into one input per image. One convention serves training-time dropout and sampling-time guidance alike (Ho & Salimans
2022): the null label is -1, and the null text is **the encoding of the empty prompt**, which a
``negative_prompt`` replaces at sampling time.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import Tensor

from diffx.errors import DiffxError

from diffx.models.conditioned import TextConditioned
from diffx.progress import work
from diffx.text import words as text_words

NULL_LABEL = -1


@dataclass
class ImageSet:
    """One set of images to draw: per image the source's input (a label, a prompt, or None), the
    negative input (None: the null condition) and its PNG text fields; ``name`` is the set's
    sub-folder, or "" for none."""

    name: str
    inputs: list
    negatives: list | None
    info: list[dict]


class Source:
    """What every condition source declares and does; the defaults are those of no condition.

    ``model_kwargs``: what the model is built with; ``guidable``: whether guidance (cfg != 1) has a
    condition to steer by; ``tells``: what it can be told of an image, "class", "caption" or None.
    """

    model_kwargs: dict = {}
    description = "unconditional"
    guidable = False
    tells: str | None = None

    def __call__(self, batch: dict, device=None) -> dict | None:
        """A training batch's condition."""
        return None

    def encode(self, inputs: list, device=None) -> dict | None:
        """One input per image (a label, a prompt, None) -> ``cond``."""
        return None

    def null(self, n: int, device=None) -> dict | None:
        return None

    def wrap(self, net):
        """The model to train: the network, with any trainable part of the condition inside it."""
        return net

    def prepare(self, captions: list[str], device=None) -> None:
        """Do any one-off encoding of the training data's conditions before the loop starts."""

    def inputs(self, options, seeds: list[int]) -> list:
        """One input per seed from the user's options (``label=``, ``prompt=`` ...)."""
        _refuse_prompts(options, "label=")
        label = options.get("label")
        if label not in (None, "random"):
            raise DiffxError(f"label={label}: this checkpoint is unconditional (it has no classes)")
        return [None] * len(seeds)

    def notes(self, inputs: list, vocabulary=()) -> list[str]:
        """Warnings about what the model will make of these inputs (prompts it cannot read in full)."""
        return []

    def image_sets(self, options, seeds: list[int]) -> list[ImageSet]:
        """What ``diffx sample`` draws: one set, in the output folder itself."""
        return [ImageSet("", self.inputs(options, seeds), None, [{}] * len(seeds))]

    def input_for(self, caption: str, class_name: str):
        """The input that tells the model about an image with this caption and class (``diffx eval``)."""
        raise DiffxError("this checkpoint is unconditional: there is no prompt to adhere to")


class Unconditional(Source):
    """No condition: ``cond`` is always None."""


class Labels(Source):
    """Class labels ``{"label": (B,)}``; the null condition is the label -1."""

    guidable, tells = True, "class"

    def __init__(self, num_classes: int, class_names=()):
        self.num_classes, self.class_names = num_classes, tuple(class_names)
        self.model_kwargs = {"num_classes": num_classes}
        self.description = f"{num_classes} class labels"

    def __call__(self, batch: dict, device=None) -> dict:
        return {"label": torch.as_tensor(batch["label"], device=device)}

    def encode(self, inputs: list[int], device=None) -> dict:
        return {"label": torch.tensor(list(inputs), dtype=torch.long, device=device)}

    def null(self, n: int, device=None) -> dict:
        return self.encode([NULL_LABEL] * n, device)

    def inputs(self, options, seeds: list[int]) -> list[int]:
        """Class label per image: ``random`` (drawn from the image's seed), ``all`` (every class in
        turn), one index or class name, or a list of them cycled."""
        _refuse_prompts(options, "label=")
        label = options.get("label")
        if label is None or label == "random":
            return [random.Random(s).randrange(self.num_classes) for s in seeds]
        if label == "all":
            label = list(range(self.num_classes))
        chosen = list(label) if isinstance(label, (list, tuple, ListConfig)) else [label]
        ids = [self._label_id(v) for v in chosen]
        return [ids[i % len(ids)] for i in range(len(seeds))]

    def image_sets(self, options, seeds: list[int]) -> list[ImageSet]:
        labels = self.inputs(options, seeds)
        return [ImageSet("", labels, None, [{"label": v, "class_name": self._name(v)} for v in labels])]

    def input_for(self, caption: str, class_name: str) -> int:
        return self._label_id(class_name)

    def _name(self, i: int) -> str:
        return self.class_names[i] if i < len(self.class_names) else str(i)

    def _label_id(self, v) -> int:
        if isinstance(v, str) and v in self.class_names:
            return self.class_names.index(v)
        try:
            i = int(v)
        except (TypeError, ValueError):
            example = f" such as {self.class_names[0]!r}" if self.class_names else ""
            raise DiffxError(f"label={v!r}: expected 'random', a class index or a class name{example}") from None
        if not 0 <= i < self.num_classes:
            raise DiffxError(f"label={i}: out of range, the checkpoint has {self.num_classes} classes "
                             f"(0..{self.num_classes - 1})")
        return i


class Text(Source):
    """Captions or prompts through a text encoder; the null condition is the empty prompt's encoding.

    The encoder's frozen stage runs once per distinct prompt: its rows are kept in a table, so a
    batch is a gather (the shapes data has a few hundred distinct captions, seen thousands of times).
    """

    guidable, tells = True, "caption"

    def __init__(self, encoder):
        self.encoder = encoder
        self.model_kwargs = {"text_dim": encoder.dim, "pooled_dim": encoder.pooled_dim}
        self.description = f"text ({type(encoder).__name__} encoder)"
        self.rows: dict[str, int] = {}
        self.table: dict[str, Tensor] = {}

    def __call__(self, batch: dict, device=None) -> dict:
        return self.encode(batch["caption"], device)

    def encode(self, prompts: list[str], device=None) -> dict:
        new = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if new:
            features = self.encoder.features(new, device)
            self.rows.update({p: len(self.rows) + i for i, p in enumerate(new)})
            self.table = {k: torch.cat([self.table[k].to(v.device), v]) if k in self.table else v
                          for k, v in features.items()}
        index = torch.tensor([self.rows[p] for p in prompts])
        return {k: v[index.to(v.device)].to(device) for k, v in self.table.items()}

    def null(self, n: int, device=None) -> dict:
        return self.encode([""] * n, device)

    def wrap(self, net):
        return TextConditioned(net, self.encoder.head())

    def prepare(self, captions: list[str], device=None, chunk: int = 256) -> None:
        """Encode every distinct caption once, up front and with a progress line, instead of
        spread over the first training steps."""
        new = [p for p in dict.fromkeys(captions) if p not in self.rows]
        with work(f"encoding {len(new)} distinct captions", len(new)) as advance:
            for lo in range(0, len(new), chunk):
                self.encode(new[lo: lo + chunk], device)
                advance(len(new[lo: lo + chunk]))

    def inputs(self, options, seeds: list[int]) -> list[str]:
        """The prompts cycled over the seeds."""
        prompts = _required_prompts(options)
        return [prompts[i % len(prompts)] for i in range(len(seeds))]

    def image_sets(self, options, seeds: list[int]) -> list[ImageSet]:
        """One set per prompt, each in its own folder, all with the same seeds."""
        n, negative = len(seeds), options.get("negative_prompt") or ""
        return [ImageSet(f"{k:02d}-{_slug(p)}", [p] * n, [negative] * n,
                         [{"prompt": p, "negative_prompt": negative}] * n)
                for k, p in enumerate(_required_prompts(options))]

    def input_for(self, caption: str, class_name: str) -> str:
        return caption

    def notes(self, inputs: list, vocabulary=()) -> list[str]:
        """One line per prompt the model cannot take as written: the empty prompt (it draws unconditional
        samples), words past the encoder's ``max_length`` (dropped), and, for an encoder trained from
        scratch with the model (``text_encoder=tiny``), words no training caption held (``vocabulary``:
        the checkpoint's ``spec.vocabulary``; the model has learnt nothing about them)."""
        lines, known = [], set(vocabulary)
        for prompt in dict.fromkeys(str(p) for p in inputs):
            if not prompt.strip():
                lines.append("prompt='' is the empty prompt: these images are unconditional (the null condition)")
                continue
            cut = self.encoder.cut(prompt) if hasattr(self.encoder, "cut") else ""
            if cut:
                lines.append(f"prompt {prompt!r} is longer than text_encoder.max_length: {cut!r} is cut off")
            if known and not getattr(self.encoder, "pretrained", True):
                unseen = [w for w in dict.fromkeys(text_words(prompt)) if w not in known]
                if unseen:
                    lines.append(f"prompt {prompt!r}: {', '.join(unseen)} never appeared in a training caption; the "
                                 f"{type(self.encoder).__name__} encoder knows only those words")
        return lines


def of(text_encoder, spec) -> Source:
    """Text when a text encoder is configured, else class labels when the data has classes, else none."""
    if text_encoder is not None:
        return Text(text_encoder)
    return Labels(spec.num_classes, spec.class_names) if spec.num_classes > 0 else Unconditional()


def prompts(options) -> list[str]:
    """``prompt`` (a string or a list), then the non-blank lines of ``prompt_file``."""
    prompt = options.get("prompt")
    found = [] if prompt is None else [str(p) for p in prompt] if isinstance(prompt, (list, ListConfig)) else [str(prompt)]
    if options.get("prompt_file"):
        path = Path(options.get("prompt_file"))
        if not path.is_file():
            raise DiffxError(f"prompt_file={path}: no such file (expected one prompt per line)")
        found += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return found


def _required_prompts(options) -> list[str]:
    found = prompts(options)
    if not found:
        raise DiffxError("this checkpoint is text-conditioned: pass prompt=\"...\" (or a list, or prompt_file=PATH)")
    return found


def _refuse_prompts(options, instead: str) -> None:
    if prompts(options) or options.get("negative_prompt"):
        raise DiffxError("prompt=/prompt_file=/negative_prompt= need a text-conditioned checkpoint (trained with "
                         f"text_encoder=...); this one takes {instead}")


def _slug(prompt: str) -> str:
    """A folder-name-safe short form of a prompt: 'a red circle!' -> 'a-red-circle'."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"


def null_like(cond: dict | None) -> dict | None:
    """A structural null for ``cond``: null labels, zeroed text features. The samplers fall back to it
    when no ``uncond`` is given; text models are always given the empty prompt's encoding instead."""
    if cond is None:
        return None
    return {k: torch.full_like(v, NULL_LABEL) if k == "label" else torch.zeros_like(v) for k, v in cond.items()}


def drop(cond: dict | None, p: float, null: dict | None = None, generator=None, keep=None) -> dict | None:
    """Replace each sample's condition by ``null`` (default ``null_like(cond)``) with probability
    ``p``: classifier-free guidance training (Ho & Salimans 2022). ``keep`` (B,) bool, when given, is
    that draw already made: which samples keep their condition."""
    if cond is None or p <= 0:
        return cond
    first = next(iter(cond.values()))
    if keep is None:
        keep = torch.rand(first.shape[0], device=first.device, generator=generator) >= p  # (B,)
    null = null_like(cond) if null is None else null
    return {k: torch.where(keep.view(-1, *([1] * (v.ndim - 1))), v, null[k]) for k, v in cond.items()}


def cat(a: dict, b: dict) -> dict:
    """Concatenate two condition dicts along the batch, padding sequences (dim 1) to the longer one."""
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if x.ndim >= 2 and x.shape[1] != y.shape[1] and x.shape[2:] == y.shape[2:]:
            length = max(x.shape[1], y.shape[1])
            x, y = (_pad_len(v, length) for v in (x, y))
        out[key] = torch.cat([x, y])
    return out


def _pad_len(v: Tensor, length: int) -> Tensor:
    pad = length - v.shape[1]
    # F.pad pads from the last dim backwards: (B, L) -> pad L; (B, L, D) -> skip D, pad L.
    spec = (0, pad) if v.ndim == 2 else (0, 0, 0, pad)
    return F.pad(v, spec)
