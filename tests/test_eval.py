"""``diffx eval``: the reader scores the dataset's own images; text and label checkpoints are scored on
what they are told; ``diffx sample`` draws one image set per prompt."""

from __future__ import annotations

import json

from conftest import compose_config

import numpy as np
import pytest
from PIL import Image

from diffx import data
from diffx import shapes as S
from diffx.errors import DiffxError
from diffx import holdout
from diffx.evaluate import ATTRIBUTES, draw, evaluate, score
from diffx.sample import sample
from diffx.train import train

TINY_TRAIN = ["model=mmdit", "model.width=16", "model.depth=1", "model.heads=2", "model.patch_size=4", "data.size=16",
              "data.n=16", "train.steps=2", "train.batch_size=8", "train.warmup=0", "train.log_every=1",
              "train.save_every=2"]


def _compose(name, overrides):
    return compose_config(name, overrides)


@pytest.mark.parametrize("size", [16, 32])
def test_the_reader_scores_the_datasets_own_images(tmp_path, size):
    held = data.shapes(size=size, n=400, seed=1, cache_dir=str(tmp_path)).dataset
    images = held.images.permute(0, 2, 3, 1).numpy()  # (N, C, H, W) -> (N, H, W, C)
    result = score(images, [S.parse_caption(c) for c in held.captions])
    assert result["exact"] >= 0.99 and min(result["accuracy"].values()) >= 0.99, result["accuracy"]


def test_blank_images_score_zero():
    result = score(np.full((2, 16, 16, 3), S.BACKGROUND, np.uint8), draw(holdout.combinations(S.SHAPES, S.COLORS), 2))
    assert result["exact"] == 0 and result["reads"][0]["shape"] is None


def test_held_out_prompts_are_a_fixed_distinct_subset_of_the_grid():
    grid = holdout.combinations(S.SHAPES, S.COLORS)
    a, b = draw(grid, 50, seed=0), draw(grid, 50, seed=0)
    assert a == b and len({S.caption(t) for t in a}) == 50
    assert draw(grid, 50, seed=1) != a
    assert len(draw(grid, 10_000)) == len(S.SHAPES) * len(S.COLORS) * len(S.SIZES) * len(S.POSITIONS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step text (tiny encoder) and label checkpoints: enough to exercise every path."""
    root = tmp_path_factory.mktemp("t2i")
    common = TINY_TRAIN + [f"data.cache_dir={root / 'cache'}"]
    text_run = train(_compose("train", common + ["text_encoder=tiny", "text_encoder.width=16", "text_encoder.depth=1",
                                                 "text_encoder.heads=2", f"run_dir={root / 'text'}"]))
    label_run = train(_compose("train", common + [f"run_dir={root / 'label'}"]))
    return root, text_run / "model.safetensors", label_run / "model.safetensors"


def _eval(ckpt, out, *extra):
    return evaluate(_compose("eval", [f"ckpt={ckpt}", f"out={out}", "captions=6", "steps=2", "cfg=[1,3]", *extra]))


def test_eval_scores_all_attributes_of_a_text_checkpoint(runs):
    root, text_ckpt, _ = runs
    report = _eval(text_ckpt, root / "eval_text")
    assert report["attributes"] == list(ATTRIBUTES) and [r["cfg"] for r in report["results"]] == [1.0, 3.0]
    on_disk = json.loads((root / "eval_text" / "eval.json").read_text())
    assert on_disk["results"][1]["n"] == 6 and set(on_disk["results"][0]["accuracy"]) == set(ATTRIBUTES)
    assert 0 <= on_disk["results"][0]["exact"] <= 1 and on_disk["splits"] == ["all"] and len(on_disk["prompts"]["all"]) == 6
    assert (root / "eval_text" / "eval_all_cfg3.png").is_file()


def test_eval_scores_shape_and_colour_of_a_label_checkpoint(runs):
    root, _, label_ckpt = runs
    report = _eval(label_ckpt, root / "eval_label", "save_grid=false")
    assert report["attributes"] == ["shape", "color"]


def test_eval_refuses_to_overwrite_an_earlier_report_unless_asked(runs):
    root, _, label_ckpt = runs
    _eval(label_ckpt, root / "eval_again", "save_grid=false")
    before = (root / "eval_again" / "eval.json").read_text()
    with pytest.raises(DiffxError, match="eval.json already exists"):
        _eval(label_ckpt, root / "eval_again", "save_grid=false")
    assert (root / "eval_again" / "eval.json").read_text() == before
    _eval(label_ckpt, root / "eval_again", "save_grid=false", "overwrite=true")


def test_sample_draws_one_set_per_prompt_with_the_prompt_in_the_pngs(runs):
    root, text_ckpt, _ = runs
    prompts = root / "prompts.txt"
    prompts.write_text("a small red circle at the top left\n\n a large blue square in the center \n")
    cfg = _compose("sample", [f"ckpt={text_ckpt}", f"out={root / 'samples'}", "n=2", "steps=2", "cfg=3",
                              "prompt=a green triangle", f"prompt_file={prompts}", "negative_prompt=a red circle"])
    files = sample(cfg)
    folders = sorted({f.parent.name for f in files})
    assert folders == ["00-a-green-triangle", "01-a-small-red-circle-at-the-top-left",
                       "02-a-large-blue-square-in-the-center"]
    png = Image.open(root / "samples" / folders[2] / "seed000001.png")
    assert png.text["prompt"] == "a large blue square in the center" and png.text["negative_prompt"] == "a red circle"


def test_sample_asks_a_text_checkpoint_for_a_prompt_and_a_label_one_for_none(runs):
    root, text_ckpt, label_ckpt = runs
    with pytest.raises(DiffxError, match="prompt="):
        sample(_compose("sample", [f"ckpt={text_ckpt}", f"out={root / 'x'}", "n=1", "steps=1"]))
    with pytest.raises(DiffxError, match="text-conditioned"):
        sample(_compose("sample", [f"ckpt={label_ckpt}", f"out={root / 'y'}", "n=1", "steps=1", "prompt=a red circle"]))


def test_sample_warns_about_words_no_training_caption_held(runs, capsys):
    root, text_ckpt, _ = runs
    from diffx.checkpoint import read_header
    assert {"circle", "red", "small", "top"} <= set(read_header(text_ckpt).spec.vocabulary)
    sample(_compose("sample", [f"ckpt={text_ckpt}", f"out={root / 'unseen'}", "n=1", "steps=1",
                               "prompt=[a purple hexagon,'']"]))
    out = capsys.readouterr().out
    assert "purple, hexagon never appeared in a training caption" in out and "empty prompt" in out


def test_eval_passes_the_guidance_options_and_records_them(runs):
    root, text_ckpt, _ = runs
    report = _eval(text_ckpt, root / "eval_guided", "save_grid=false", "guidance.rescale=0.7", "guidance.interval=[0.2,0.8]")
    assert report["guidance"] == {"rescale": 0.7, "interval": (0.2, 0.8)}
    with pytest.raises(DiffxError, match="guidance.rescale"):
        _eval(text_ckpt, root / "eval_bad", "save_grid=false", "guidance.rescale=2")
