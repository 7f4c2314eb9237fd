"""The compositional hold-out (data.holdout) never reaches training and is what ``diffx eval split=heldout``
scores; augmented captions vary the phrasing but keep the attributes; held-out phrasings share no
template or synonym with training."""

from __future__ import annotations

import random
import re

import pytest

from diffx import captions, data, holdout
from diffx import shapes as S
from diffx.errors import DiffxError

GRID = holdout.combinations(S.SHAPES, S.COLORS)


def test_a_fraction_holds_out_that_share_of_combinations_reproducibly_and_keeps_every_value():
    a = holdout.held_out(0.2, S.SHAPES, S.COLORS, seed=0)
    assert len(a) == round(0.2 * len(GRID)) and a == holdout.held_out(0.2, S.SHAPES, S.COLORS, seed=0)
    assert a != holdout.held_out(0.2, S.SHAPES, S.COLORS, seed=1)
    seen = holdout.split("seen", 0.2, S.SHAPES, S.COLORS)
    assert len(seen) + len(a) == len(GRID) and not {holdout.key(x) for x in seen} & {holdout.key(x) for x in a}
    for attr in holdout.ATTRIBUTES:  # every single value is still trained on
        assert {x[attr] for x in seen} == {x[attr] for x in GRID}


def test_patterns_hold_out_every_combination_that_matches_them():
    out = holdout.held_out(["red circle", "large triangle at the top left"], S.SHAPES, S.COLORS)
    assert all((x["color"], x["shape"]) == ("red", "circle")
               or (x["size"], x["shape"], x["position"]) == ("large", "triangle", "top left") for x in out)
    assert len(out) == 2 * 9 + 6  # red circles (2 sizes x 9 positions), large top-left triangles (6 colours)


@pytest.mark.parametrize("bad", [1.5, 0, ["purple hexagon"], ["red circle", "the moon"]])
def test_bad_holdouts_are_refused_in_one_line_naming_the_key(bad):
    if bad == 0:
        assert holdout.held_out(bad, S.SHAPES, S.COLORS) == []
        with pytest.raises(DiffxError, match="split=heldout"):
            holdout.split("heldout", bad, S.SHAPES, S.COLORS)
        return
    with pytest.raises(DiffxError, match="data.holdout"):
        holdout.held_out(bad, S.SHAPES, S.COLORS)


def test_training_data_never_shows_a_held_out_combination(tmp_path):
    d = data.shapes(size=16, n=600, seed=3, cache_dir=str(tmp_path), holdout=["red circle", "large"])
    items = [d.dataset[i] for i in range(len(d.dataset))]
    assert all(S.parse_caption(it["caption"])["size"] == "small" for it in items)
    assert not any(c.startswith("a small red circle") for c in d.dataset.captions)
    plain = data.shapes(size=16, n=600, seed=3, cache_dir=str(tmp_path))  # no hold-out: the old images and cache
    assert plain.dataset.captions != d.dataset.captions


def test_augmented_captions_vary_but_name_every_attribute(tmp_path):
    d = data.shapes(size=16, n=300, seed=0, cache_dir=str(tmp_path), captions="augmented")
    plain = data.shapes(size=16, n=300, seed=0, cache_dir=str(tmp_path))
    assert len(set(d.dataset.captions)) > max(0.9 * 300, len(set(plain.dataset.captions)))
    synonyms = {w: {w, *captions.TRAIN_WORDS.get(w, ())} for name in (*S.SIZES, *S.POSITIONS, *S.SHAPES)
                for w in name.split()}
    for text, truth in zip(d.dataset.captions, plain.dataset.captions):
        attrs = S.parse_caption(truth)  # the same images: the augmented caption describes them
        words = set(re.findall(r"[a-z]+", text))
        assert attrs["color"] in words
        for name in (attrs["size"], attrs["shape"], attrs["position"]):
            assert all(synonyms[w] & words for w in name.split()), (text, truth)


def test_held_out_phrasings_share_no_template_or_synonym_with_training():
    assert not set(captions.TRAIN_TEMPLATES) & set(captions.HELD_OUT_TEMPLATES)
    for word, held in captions.HELD_OUT_WORDS.items():
        assert not set(held) & set(captions.TRAIN_WORDS.get(word, (word,)))
    rng = random.Random(0)
    train = {captions.describe(a, rng, "augmented") for a in GRID for _ in range(3)}
    assert not train & {captions.describe(a, rng, "paraphrase") for a in GRID}
    assert captions.describe(GRID[0], rng, "template") == S.caption(GRID[0])
