"""Captions of the shapes data: the one template, augmented phrasings, and held-out paraphrases.

``diffx.shapes.caption`` writes every image's attributes in one fixed grammar ("a small red circle at
the top left"). A text encoder trained on that alone learns the template, not the meaning: a user's
"big red circle, middle" is a sentence it never saw. ``data.captions=augmented`` draws each image's
caption instead from several templates and word orders, with synonyms (big/large, centre/middle,
lower/bottom) and optional extra words, so that an encoder, a pretrained one above all
(``text_encoder=minilm``), has to read what the words mean.

``paraphrase`` phrasings use templates and synonyms that no training caption uses (``TRAIN`` and
``HELD_OUT`` share no template and no synonym beyond the attribute names themselves), so
``diffx eval prompts=paraphrase`` measures understanding of new phrasings, not recall.
"""

from __future__ import annotations

import random

from diffx import shapes as rules
from diffx.errors import DiffxError

# Word-level synonyms per attribute word; the first entry of each is the template's own word.
TRAIN_WORDS = {
    "small": ("small", "tiny"), "large": ("large", "big"),
    "center": ("center", "centre", "middle"), "top": ("top", "upper"), "bottom": ("bottom", "lower"),
    "circle": ("circle", "disc"),
}
HELD_OUT_WORDS = {"small": ("little",), "large": ("huge",), "circle": ("round shape",)}

# {size} {color} {shape} {where}; ``where`` is "at the top left", "on the left", "in the center".
TRAIN_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "{size} {color} {shape}, {where}",
    "a {color} {shape}, {size}, {where}",
    "{where}: a {size} {color} {shape}",
    "there is a {size} {color} {shape} {where}",
    "a {shape}, {color} and {size}, {where}",
)
HELD_OUT_TEMPLATES = (
    "draw one {color} {shape} of {size} size placed {where}",
    "{where} you see a {size} {shape} coloured {color}",
    "the {shape} is {color} and {size}; it sits {where}",
)
TRAIN_EXTRAS = (("", "an image of ", "a picture of "), ("", " on a dark background"))

STYLES = ("template", "augmented", "paraphrase")


def describe(attrs: dict, rng: random.Random, style: str = "augmented") -> str:
    """One caption of ``attrs`` in ``style``: ``template`` is ``shapes.caption`` exactly; ``augmented``
    a training phrasing (template, synonyms and extra words drawn from ``rng``); ``paraphrase`` a
    held-out phrasing (held-out templates, and held-out synonyms where an attribute has one)."""
    if style == "template":
        return rules.caption(attrs)
    if style not in STYLES:
        raise DiffxError(f"captions={style!r}: expected one of {list(STYLES)}")
    train = style == "augmented"
    words = TRAIN_WORDS if train else HELD_OUT_WORDS

    def say(name: str) -> str:  # each word of an attribute name, through the synonyms
        return " ".join(rng.choice(words.get(w, (w,))) for w in name.split())

    position = attrs["position"]
    # "upper"/"lower" read well only before "left"/"right": a lone "top" or "bottom" stays as it is
    where = f"{rules.PHRASES[position]} {say(position) if position not in ('top', 'bottom') else position}"
    template = rng.choice(TRAIN_TEMPLATES if train else HELD_OUT_TEMPLATES)
    text = template.format(size=say(attrs["size"]), color=attrs["color"], shape=say(attrs["shape"]), where=where)
    if train:  # optional extra words; "an image of" only before a noun phrase
        prefix = rng.choice(TRAIN_EXTRAS[0])
        text = (prefix if template.startswith("a ") else "") + text + rng.choice(TRAIN_EXTRAS[1])
    return text


def captions(attrs: list[dict], style: str, seed: int) -> list[str]:
    """One caption per attribute set, reproducible from ``seed``."""
    rng = random.Random(f"captions-{style}-{seed}")
    return [describe(a, rng, style) for a in attrs]
