"""Learning-rate schedules: properties of each curve, the old warm-up kept exactly, a real run's log,
a resume that matches a straight run, and one-line errors for bad values."""

import json
import math

import pytest
import torch
from conftest import TINY_TRAIN, compose_config
from hydra.utils import instantiate

from diffx.cli import user_message
from diffx.errors import DiffxError
from diffx.lr_schedules import Constant, Cosine, Linear

# (warmup, total): no warm-up, a one-step one, a short one, one that is most of the run.
SHAPES = [(0, 10), (1, 10), (5, 40), (90, 100)]
FINALS = [0.0, 0.1, 1.0]


def schedules():
    for warmup, total in SHAPES:
        yield Constant(warmup, total)
        for final in FINALS:
            yield Cosine(warmup, total, final)
            yield Linear(warmup, total, final)


def final_of(f):
    return getattr(f, "final", 1.0)


def ids(f):
    return f"{type(f).__name__}(warmup={f.warmup},total={f.total},final={final_of(f)})"


@pytest.mark.parametrize("warmup", [0, 1, 3, 100])
def test_constant_is_the_old_warm_up_lambda_at_every_step(warmup):
    f = Constant(warmup, total=200)
    assert all(f(s) == min(1.0, (s + 1) / max(1, warmup)) for s in range(300))


@pytest.mark.parametrize("f", list(schedules()), ids=ids)
def test_warm_up_is_linear_and_meets_the_decay_at_the_peak(f):
    w, total = f.warmup, f.total
    assert [f(s) for s in range(w)] == pytest.approx([(s + 1) / w for s in range(w)], rel=1e-12)
    # continuous at the end of the warm-up: both pieces are 1 there, and the first step after it moves
    # no more than the steepest slope of the decay (pi / 2 for the cosine) allows
    assert f(max(w - 1, 0)) == pytest.approx(1.0) and f(w) == pytest.approx(1.0)
    assert 1 - f(w + 1) <= (1 - final_of(f)) * math.pi / 2 / (total - w) + 1e-12


@pytest.mark.parametrize("f", list(schedules()), ids=ids)
def test_after_the_warm_up_it_never_rises_and_ends_at_final(f):
    after = [f(s) for s in range(max(f.warmup - 1, 0), f.total + 5)]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert f(f.total) == pytest.approx(final_of(f), abs=1e-12)
    assert f(f.total + 4) == f(f.total)  # held after the last step


@pytest.mark.parametrize("warmup,total", [(0, 10), (6, 40)])
@pytest.mark.parametrize("final", FINALS)
def test_cosine_midpoint_is_halfway_and_linear_falls_by_equal_steps(warmup, total, final):
    assert Cosine(warmup, total, final)((warmup + total) / 2) == pytest.approx((1 + final) / 2)
    f = Linear(warmup, total, final)
    drops = [f(s) - f(s + 1) for s in range(warmup, total)]
    assert drops == pytest.approx([(1 - final) / (total - warmup)] * len(drops))


def test_the_schedule_is_config_not_resume_state():
    """LambdaLR saves a callable's __dict__: it must be JSON (the resume state's format) and must not
    carry the first run's train.steps into a run resumed with more steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = torch.optim.lr_scheduler.LambdaLR(opt, Cosine(2, 10, 0.1))
    for _ in range(4):
        opt.step()
        first.step()
    state = json.loads(json.dumps(first.state_dict()))
    longer = Cosine(2, 20, 0.1)
    resumed = torch.optim.lr_scheduler.LambdaLR(opt, longer)
    resumed.load_state_dict(state)
    assert (longer.warmup, longer.total, longer.final) == (2, 20, 0.1) and resumed.last_epoch == 4
    opt.step()
    resumed.step()
    assert resumed.get_last_lr() == [longer(5)]


def _tiny(tmp_path, name, *overrides):
    return compose_config("train", TINY_TRAIN + [f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                                                 "lr_schedule=cosine", "lr_schedule.final=0.1", *overrides])


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_cosine_run_logs_the_schedule(tmp_path):
    from diffx.train import train

    cfg = _tiny(tmp_path, "run")
    f = instantiate(cfg.lr_schedule, warmup=cfg.train.warmup, total=cfg.train.steps)
    log = _log(train(cfg))
    # LambdaLR's rate after step k, the one logged at step k, is lr x f(k)
    assert [r["step"] for r in log] == [1, 2]
    assert [r["lr"] for r in log] == pytest.approx([cfg.train.lr * f(r["step"]) for r in log], rel=1e-12)
    assert log[0]["lr"] < cfg.train.lr and log[-1]["lr"] == pytest.approx(0.1 * cfg.train.lr)


def test_a_cosine_run_resumes_exactly_and_re_plans_for_more_steps(tmp_path, monkeypatch):
    from diffx import checkpoint, train as train_module
    from diffx.train import train

    straight = train(_tiny(tmp_path, "a", "train.steps=4", "train.warmup=1"))

    # stopped right after the resume state of step 2 is saved, then resumed with the same config
    real_save = train_module.save_state

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(tmp_path, "b", "train.steps=4", "train.warmup=1"))
    monkeypatch.undo()
    resumed = train(_tiny(tmp_path, "b", "train.steps=4", "train.warmup=1"))
    assert json.loads((resumed / "state" / "trainer.json").read_text())["scheduler"]["lr_lambdas"] == [{}]
    assert [r["lr"] for r in _log(resumed)] == [r["lr"] for r in _log(straight)]
    a, b = checkpoint.read(straight / "model.safetensors"), checkpoint.read(resumed / "model.safetensors")
    assert a.step == b.step == 4
    for k in a.weights:
        torch.testing.assert_close(a.weights[k], b.weights[k], rtol=1e-5, atol=1e-6)

    # a finished 2-step run continued to 4: the decay is re-planned for train.steps=4, not kept at 2
    train(_tiny(tmp_path, "c", "train.steps=2", "train.warmup=1"))
    extended = train(_tiny(tmp_path, "c", "train.steps=4", "train.warmup=1"))
    assert [r["lr"] for r in _log(extended)][2:] == [r["lr"] for r in _log(straight)][2:]


@pytest.mark.parametrize("override,key", [
    ("lr_schedule.final=2", "lr_schedule.final=2"), ("lr_schedule.final=-0.1", "lr_schedule.final=-0.1"),
    ("lr_schedule.final=abc", "lr_schedule.final=abc"), ("lr_schedule.final=true", "lr_schedule.final=True"),
    ("train.warmup=2", "train.warmup=2")])  # warm-up as long as the run: the decay never starts
def test_bad_values_fail_with_one_line_naming_the_key(override, key):
    cfg = compose_config("train", ["lr_schedule=cosine", "train.steps=2", override])
    with pytest.raises(Exception) as e:  # Hydra wraps the constructor's DiffxError; the CLI unwraps it
        instantiate(cfg.lr_schedule, warmup=cfg.train.warmup, total=cfg.train.steps)
    message = user_message(e.value)
    assert message.startswith(key + ":") and "\n" not in message, message
    with pytest.raises(DiffxError, match="lr_schedule.final=2: expected a number in"):
        Linear(0, 10, final=2)
