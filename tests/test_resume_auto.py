"""``resume=auto`` continues the newest run under ``out=`` with the same config, else starts one;
``train.keep_last=K`` keeps the last K resume states and a resume reads the newest complete one."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import TINY_TRAIN, compose_config
from diffx import config, resume
from diffx.errors import DiffxError
from diffx.validate import validate


def fake_run(run, overrides, states=("state",), mtime=0.0, step=2):
    """A run dir as diffx train leaves it, as far as resume=auto reads it: config.yaml and resume states."""
    cfg = compose_config("train", TINY_TRAIN + overrides + [f"run_dir={run}"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for name in states:
        (run / name).mkdir()
        (run / name / "trainer.json").write_text(json.dumps({"step": step}))
        os.utime(run / name / "trainer.json", (mtime, mtime))
    return run


def test_auto_picks_the_newest_run_with_the_same_config(tmp_path):
    out = tmp_path / "runs"
    cfg = compose_config("train", TINY_TRAIN + ["resume=auto", f"out={out}"])
    older = fake_run(out / "older", [], mtime=1)
    # the keys that name, place or extend a run do not count; a keep_last > 1 layout is found too
    newer = fake_run(out / "newer", ["train.steps=99", "train.keep_last=3", "out=elsewhere"], ("state-2",), mtime=2)
    fake_run(out / "other_lr", ["train.lr=1e-4"], mtime=3)
    fake_run(out / "no_state", [], states=(), mtime=4)
    (out / "broken").mkdir()
    (out / "broken" / "config.yaml").write_text("{not: yaml: [")
    (out / "broken" / "state").mkdir()
    (out / "broken" / "state" / "trainer.json").write_text('{"step": 1}')

    assert config.run_dir(str(out), "auto", cfg) == str(newer)
    os.utime(older / "state" / "trainer.json", (5, 5))  # the run saved last is the newest
    assert config.run_dir(str(out), "auto", cfg) == str(older)
    other = compose_config("train", TINY_TRAIN + ["resume=auto", f"out={out}", "seed=1"])
    assert config.run_dir(str(out), "auto", other) == f"{out}/{config.run_id()}"  # none: a new run
    assert config.run_dir(str(tmp_path / "missing"), "auto", cfg) == f"{tmp_path / 'missing'}/{config.run_id()}"


def test_auto_through_the_command_line_starts_then_continues_a_run(tmp_path):
    args = [sys.executable, "-m", "diffx", "train", *TINY_TRAIN, "resume=auto", "out=runs",
            f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert f"resume=auto: no run under runs has this config and a resume state; starting {run}" in first.stdout
    second = subprocess.run(args + ["train.steps=4"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
    assert f"resuming {run} at step 2 (resume=auto: the newest run under runs with this config)" in second.stdout
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def _train(tmp_path, *overrides):
    from diffx.train import train

    return train(compose_config("train", TINY_TRAIN + [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                                                       *overrides]))


def test_keep_last_keeps_the_last_states_and_a_resume_reads_the_newest(tmp_path):
    run = _train(tmp_path)  # keep_last=1: state/
    names = lambda: sorted(p.name for p in run.iterdir() if p.name.startswith("state"))  # noqa: E731
    assert names() == ["state"]
    meta = json.loads((run / "state" / "trainer.json").read_text())
    assert (meta["world_size"], meta["batch_size"], meta["grad_accum"]) == (1, 8, 1)

    _train(tmp_path, "train.steps=6", "train.keep_last=2")  # saves at 4 and 6; state/ (step 2) goes
    assert names() == ["state-4", "state-6"]
    _train(tmp_path, "train.steps=8", "train.keep_last=1")  # from step 6, the newest; back to one state/
    assert names() == ["state"] and json.loads((run / "state" / "trainer.json").read_text())["step"] == 8
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == list(range(1, 9))


def test_the_newest_complete_state_is_read_whatever_its_name(tmp_path):
    for name, step in [("state", 2), ("state-4", 4), ("state-6.old", 6), ("state-5", 5)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer.json").write_text(json.dumps({"step": step}))
    (tmp_path / "state-9").mkdir()  # no trainer.json: not a state
    (tmp_path / ".state-9.tmp-1-abcd").mkdir()  # a save in progress
    (tmp_path / ".state-9.tmp-1-abcd" / "trainer.json").write_text(json.dumps({"step": 9}))
    assert [p.name for p in resume.states(tmp_path)] == ["state", "state-4", "state-5", "state-6.old"]
    resume.check_resumable(tmp_path)
    resume.check_resumable("auto")


def test_keep_last_must_be_positive():
    with pytest.raises(DiffxError, match="train.keep_last=0"):
        validate(compose_config("train", ["train.keep_last=0"]), "train")
