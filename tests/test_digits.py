"""``data=digits`` (scikit-learn's bundled handwritten digits), its classifier, and ``train.eval_every``:
sample metrics of the EMA weights written to log.jsonl beside the loss, with their grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config
from test_metrics import PixelFeatures
from sklearn.datasets import load_digits

from diffx import data
from diffx.errors import DiffxError
from diffx.metrics import classifier, suite
from diffx.train import train
from diffx.validate import validate


def test_digits_are_the_bundled_set_one_grey_channel_labelled_0_to_9():
    d = data.digits(size=8)
    assert (len(d.dataset), d.channels, d.image_size, d.num_classes) == (1797, 1, 8, 10)
    assert d.class_names == [str(k) for k in range(10)]
    bunch = load_digits()
    # at 8x8 the pixels are the originals, 0..16 -> 0..255
    assert torch.equal(d.dataset.images[:, 0], torch.from_numpy(np.round(bunch.images * 255 / 16).astype(np.uint8)))
    assert d.dataset.labels.tolist() == bunch.target.tolist()
    item = d.dataset[5]
    assert item["x"].shape == (1, 8, 8) and item["x"].min() >= -1 and item["x"].max() <= 1
    assert item["caption"] == f"the digit {bunch.target[5]}"


def test_digits_upsample_and_refuse_a_smaller_size():
    d = data.digits(size=16)
    assert d.dataset.images.shape == (1797, 1, 16, 16) and d.dataset.images.dtype == torch.uint8
    assert np.bincount(d.dataset.labels.numpy()).min() >= 170  # about 180 of each digit
    with pytest.raises(DiffxError, match="size >= 8"):
        data.digits(size=4)


TINY = ["data=digits", "model=mmdit", "model.width=16", "model.depth=1", "model.heads=2", "model.patch_size=4",
        "train.batch_size=8", "train.warmup=0", "train.log_every=2", "train.save_every=4"]


def test_eval_every_logs_metrics_beside_the_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the classifier and reference caches (~/.cache/diffx)
    monkeypatch.setitem(classifier.RECIPE, "epochs", 1)
    monkeypatch.setattr(suite, "Inception", PixelFeatures)
    cfg = compose_config("train", TINY + ["train.steps=4", "train.eval_every=2", "train.eval_samples=4",
                                          "train.eval_reference=6", "train.eval_metrics=[kid,class_accuracy]",
                                          f"run_dir={tmp_path / 'run'}"])
    validate(cfg, "train")
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/kid" in r]
    assert [r["step"] for r in evals] == [2, 4] and [r["step"] for r in rows if "loss" in r] == [2, 4]
    for r in evals:
        assert r["eval/n"] == 4 and r["eval/reference_n"] == 6 and 0 <= r["eval/class_accuracy"] <= 1
        assert np.isfinite(r["eval/kid"])
    assert (run / "samples" / "eval_step000002.png").is_file() and (run / "samples" / "eval_step000004.png").is_file()
    assert len(list((tmp_path / "home" / ".cache" / "diffx" / "classifier").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("override, message", [("train.eval_every=-1", "eval_every=-1"),
                                               ("train.eval_metrics=[fud]", "eval_metrics"),
                                               ("train.eval_samples=1", "eval_samples=1")])
def test_eval_every_settings_are_checked(tmp_path, override, message):
    cfg = compose_config("train", TINY + ["train.eval_every=2", override, f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(DiffxError, match=message):
        validate(cfg, "train")


@pytest.mark.slow  # ~35 s on 2 shared cores: the real recipe
def test_the_digit_classifier_reads_real_digits_it_never_saw(tmp_path):
    clf = classifier.classifier({"_target_": "diffx.data.digits", "size": 16}, data.digits(16), tmp_path)
    assert clf.heldout_accuracy >= 0.97
    again = classifier.classifier({"_target_": "diffx.data.digits", "size": 16}, data.digits(16), tmp_path)  # cached
    assert again.heldout_accuracy == clf.heldout_accuracy
