"""End to end through the installed ``diffx`` command: train a tiny model, then sample PNGs."""

import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from diffx.samplers import learned

# `make test` installs diffx, so the command must be there: a missing one fails, it does not skip.
DIFFX = shutil.which("diffx") or "diffx"

TINY = ["train.steps=3", "train.warmup=0", "train.batch_size=8", "train.log_every=1", "train.save_every=3", "data.size=16",
        "data.n=32", "model.channels=8", "model.attn_resolutions=[4]"]


def diffx(*args, cwd, check=True):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([DIFFX, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"diffx {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    diffx("train", *TINY, f"data.cache_dir={cwd / 'cache'}", "out=runs", cwd=cwd)
    (run,) = (cwd / "runs").iterdir()
    return cwd, run


def test_train_writes_checkpoint_log_and_state(trained):
    _, run = trained
    assert (run / "model.safetensors").is_file()
    assert (run / "state" / "trainer.json").is_file()
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(r["loss"] > 0 for r in lines)


def test_sample_writes_pngs_with_settings_and_a_grid(trained):
    cwd, run = trained
    diffx("sample", f"ckpt={run / 'model.safetensors'}", "n=2", "steps=2", "sampler=ddim", "cfg=2", "out=out", cwd=cwd)
    pngs = sorted((cwd / "out").glob("seed*.png"))
    assert [p.name for p in pngs] == ["seed000000.png", "seed000001.png"]
    text = Image.open(pngs[1]).text
    assert text["seed"] == "1" and text["sampler"] == "ddim" and text["steps"] == "2" and float(text["cfg"]) == 2
    assert Image.open(pngs[0]).size == (16, 16)
    assert list((cwd / "out").glob("grid_*.png"))


def test_image_is_the_same_whatever_the_batch_size(trained):
    cwd, run = trained
    ckpt = f"ckpt={run / 'model.safetensors'}"
    diffx("sample", ckpt, "n=3", "steps=2", "batch_size=3", "out=b3", cwd=cwd)
    diffx("sample", ckpt, "n=3", "steps=2", "batch_size=1", "out=b1", cwd=cwd)
    for i in range(3):
        a = Image.open(cwd / "b3" / f"seed{i:06d}.png").tobytes()
        b = Image.open(cwd / "b1" / f"seed{i:06d}.png").tobytes()
        assert a == b


def test_help_lists_commands_and_hydra_flags_work(tmp_path):
    assert "train" in diffx("--help", cwd=tmp_path).stdout and "sample" in diffx("--help", cwd=tmp_path).stdout
    help_text = diffx("train", "--help", cwd=tmp_path).stdout
    assert "diffx train" in help_text and "Configuration groups" in help_text and "objective: ddpm, flow" in help_text
    job = diffx("train", "--cfg", "job", "objective=ddpm", cwd=tmp_path).stdout
    assert "diffx.objectives.DDPM" in job and "diffx.schedules.cosine" in job


def test_multirun_makes_one_run_dir_per_job(tmp_path):
    diffx("train", "-m", "train.lr=1e-4,3e-4", *TINY, f"data.cache_dir={tmp_path / 'cache'}", "out=runs", cwd=tmp_path)
    (sweep,) = (tmp_path / "runs").glob("multirun-*")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "model.safetensors").is_file())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = {float(json.loads((p / "log.jsonl").read_text().splitlines()[-1])["lr"]) for p in jobs}
    assert lrs == {1e-4, 3e-4}


def test_user_error_is_one_line(tmp_path):
    proc = diffx("sample", "ckpt=does/not/exist.safetensors", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "does/not/exist.safetensors" in proc.stderr


def test_calibrate_then_sample_with_the_fitted_solver(trained):
    """``diffx calibrate`` writes a solver next to the checkpoint, reports the held-out error before and
    after, refuses to overwrite it, and ``diffx sample sampler=learned`` runs it at its own NFE."""
    cwd, run = trained
    ckpt = run / "model.safetensors"
    args = ["calibrate", f"ckpt={ckpt}", "sampler=unipc", "steps=4", "samples=16", "validation=8", "holdout=8", "iters=3",
            "batch_size=8", "reference_steps=8", "freeze=[0.5,0]", "method=[joint,lbfgs]"]
    proc = diffx(*args, cwd=cwd)
    solver = run / "solver_unipc_4.safetensors"
    assert solver.is_file() and "held-out RMS endpoint error" in proc.stdout
    meta = learned.load(solver).meta
    assert meta["fits_tried"] == [f"{m} freeze={f}" for m in ("joint", "lbfgs") for f in (0, 0.5)]  # one chosen:
    assert meta["method"] in ("joint", "lbfgs") and meta["freeze"] in (0.0, 0.5)
    again = diffx(*args, cwd=cwd, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    proc = diffx("sample", f"ckpt={ckpt}", "sampler=learned", f"sampler.path={solver}", "n=2", "out=learned",
                 cwd=cwd)
    assert "learned(unipc), 4 steps, 4 NFE" in proc.stdout
    with Image.open(cwd / "learned" / "seed000000.png") as im:
        assert im.text["sampler"] == "learned(unipc)" and im.text["steps"] == "4"


@pytest.mark.parametrize("override,expect", [("sampler=ddpm", "deterministic sampler"),
                                             ("holdout=0", "holdout"), ("learn_times=maybe", "learn_times"),
                                             ("freeze=[0,1]", "freeze=[0, 1]: expected a share"),
                                             ("method=[joint,adam]", "expected one of joint, staged, lbfgs")])
def test_calibrate_bad_input_is_one_line(trained, override, expect):
    cwd, run = trained
    proc = diffx("calibrate", f"ckpt={run / 'model.safetensors'}", override, cwd=cwd, check=False)
    assert proc.returncode == 1 and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sampler", ["heun", "ddpm", "dpmpp_sde", "dpmpp_3m", "ipndm"])
def test_every_kind_of_sampler_runs_from_the_cli(trained, sampler):
    """Issue #3's acceptance: heun, ddpm and dpmpp_sde (and the other multistep ones) sample a trained
    checkpoint from the command line, and the PNGs record the NFE they cost (Heun: up to 2 per step)."""
    cwd, run = trained
    diffx("sample", f"ckpt={run / 'model.safetensors'}", f"sampler={sampler}", "steps=4", "n=2", f"out=s_{sampler}",
          cwd=cwd)
    with Image.open(cwd / f"s_{sampler}" / "seed000001.png") as im:
        nfe, steps = int(im.text["nfe"]), int(im.text["steps"])
    assert steps == 4 and (steps < nfe <= 2 * steps if sampler == "heun" else nfe == steps)
