"""save -> load preserves the weights, the config and the data spec exactly; resume replays the run."""

import json

from conftest import compose_config, saved_random_model

import torch

from diffx import checkpoint
from diffx.build import DataSpec, parts_config


def _cfg(overrides):
    return compose_config("train", overrides)


def test_save_load_round_trip(tmp_path):
    cfg = _cfg(["model=mmdit", "model.width=32", "model.depth=1", "model.heads=2", "objective=ddpm",
                "objective.prediction=v", "schedule=linear"])
    spec = DataSpec(channels=3, image_size=8, num_classes=5, class_names=tuple("abcde"))
    path = tmp_path / "model.safetensors"
    parts = saved_random_model(cfg, spec, path, step=7)

    loaded, ckpt = checkpoint.load(path)
    assert ckpt.step == 7 and ckpt.spec == spec
    assert json.dumps(ckpt.parts, sort_keys=True) == json.dumps(parts_config(cfg), sort_keys=True)
    want = parts.model.state_dict()
    got = loaded.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert loaded.objective.prediction == "v" and type(loaded.objective.schedule) is type(parts.objective.schedule)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    cond = {"label": torch.tensor([1, -1])}
    torch.testing.assert_close(parts.model.eval()(x, t, cond), loaded.model(x, t, cond), rtol=0, atol=0)


def test_resume_continues_where_the_run_stopped(tmp_path):
    """A run stopped at step 4 and resumed to 8 ends with the same weights as one run straight to 8."""
    from diffx.train import train

    common = ["data.size=8", "data.n=64", f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=8",
              "model.channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "train.log_every=2",
              "train.save_every=4", "train.warmup=3"]
    straight = _cfg(common + ["train.steps=8", f"run_dir={tmp_path / 'a'}"])
    train(straight)
    first = _cfg(common + ["train.steps=4", f"run_dir={tmp_path / 'b'}"])
    train(first)
    resumed = _cfg(common + ["train.steps=8", f"run_dir={tmp_path / 'b'}"])
    train(resumed)
    a = checkpoint.read(tmp_path / "a" / "model.safetensors")
    b = checkpoint.read(tmp_path / "b" / "model.safetensors")
    assert a.step == b.step == 8
    for k in a.weights:
        torch.testing.assert_close(a.weights[k], b.weights[k], rtol=1e-5, atol=1e-6)
