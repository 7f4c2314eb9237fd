"""What a training run writes beside its JSONL log: a tracker's files (TensorBoard, offline), the loss
curve, metrics.json with the EMA model's loss on the probe batch, and sample grids every N steps."""

import json
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_TRAIN, compose_config
from test_cli import diffx

from diffx import checkpoint, conditioning, monitor, trackers
from diffx.errors import DiffxError
from diffx.train import train
from diffx.validate import validate


def _train(tmp_path, name, *overrides):
    cfg = compose_config("train", TINY_TRAIN + [f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                                                *overrides])
    return train(cfg), cfg


def test_tensorboard_tracker_logs_the_losses_at_the_log_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = _train(tmp_path, "run", "train.log_with=tensorboard")
    (events,) = (run / "trackers" / trackers.PROJECT).glob("events.out.tfevents.*")
    board = EventAccumulator(str(events.parent))
    board.Reload()
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(e.step, pytest.approx(e.value)) for e in board.Scalars("loss")] == [(r["step"], r["loss"]) for r in logged]
    (probe,) = board.Scalars("probe_loss")
    assert probe.step == 2 and probe.value == pytest.approx(json.loads((run / "metrics.json").read_text())["probe_loss"])


def test_every_run_writes_its_loss_curve_and_the_probe_loss_of_its_ema_weights(tiny_run):
    with Image.open(tiny_run / "loss.png") as im:
        im.verify()
        assert im.format == "PNG"
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    last = json.loads((tiny_run / "log.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["final_loss"] == last["loss"] and metrics["seconds"] > 0
    # the number is the saved (EMA) weights' loss on the probe batch: recomputed from the checkpoint
    parts, _ = checkpoint.load(tiny_run / "model.safetensors", "cpu")
    cfg = compose_config("train", TINY_TRAIN + [f"data.cache_dir={tiny_run.parent / 'cache'}"])
    data = instantiate(cfg.data)
    again = monitor.probe_loss(parts.model, parts.objective, parts.condition, data.dataset, lambda x: x, "cpu")
    assert again == pytest.approx(metrics["probe_loss"], rel=1e-6)


def test_sample_every_writes_grids_at_its_steps_and_leaves_training_unchanged(tmp_path):
    run, _ = _train(tmp_path, "previews", "train.steps=3", "train.save_every=3", "train.sample_every=2")
    plain, _ = _train(tmp_path, "plain", "train.steps=3", "train.save_every=3")
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step000002.png"]
    with Image.open(run / "samples" / "step000002.png") as im:
        assert im.format == "PNG" and im.text["step"] == "2" and im.text["sampler"] == "dpmpp"
    a, b = load_file(str(run / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # drawing a grid draws no training RNG
    assert not (plain / "samples").exists()


def test_preview_inputs_follow_what_the_condition_can_be_told():
    captions = [f"caption {i % 20}" for i in range(100)]
    assert monitor.preview_inputs(conditioning.Labels(18), captions) == list(range(16))
    assert monitor.preview_inputs(conditioning.Unconditional(), captions) == [None] * 16
    text = monitor.preview_inputs(conditioning.Text(SimpleNamespace(dim=4, pooled_dim=4)), captions)
    assert len(text) == 16 and len(set(text)) == 16 and set(text) <= set(captions)


def test_a_bad_tracker_is_one_line(tmp_path):
    proc = diffx("train", "train.log_with=tensorbord", *TINY_TRAIN, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == ("diffx train: error: train.log_with=tensorbord: expected null or one of "
                                   "tensorboard, trackio, wandb, mlflow, aim")


def test_a_tracker_that_is_not_installed_names_its_extra(monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "wandb", (("diffx_no_such_package",), "wandb"))
    cfg = compose_config("train", TINY_TRAIN + ["train.log_with=wandb"])
    with pytest.raises(DiffxError, match=r"^train.log_with=wandb needs the diffx_no_such_package package, which is "
                                         r"not installed: pip install 'diffx\[wandb\]'$"):
        validate(cfg, "train")
