"""Bad input gets one clear line naming the key or file, and nothing the user made is lost:
config validation, the CLI's error lines, outputs and run dirs, data errors, NaN losses.
(Checkpoint files: tests/test_checkpoint.py.)"""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import TINY_TRAIN, compose_config
from omegaconf import OmegaConf
from PIL import Image

from diffx import checkpoint, data
from diffx.build import DataSpec, build, parts_config
from diffx.errors import DiffxError
from diffx.validate import validate

DIFFX = shutil.which("diffx") or "diffx"  # installed by `make test`: missing, it fails rather than skips


def _cfg(command, overrides):
    return compose_config(command, overrides)


def _train_cfg(tmp_path, tiny_run, *overrides):
    """The tiny run's config (and its rendered shapes cache), with a run dir under ``tmp_path``."""
    return _cfg("train", TINY_TRAIN + [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tiny_run.parent / 'cache'}",
                                       *overrides])


# --- config validation: one DiffxError naming the key, before any data is loaded ---------------------

TRAIN_ERRORS = [
    (["data.size=18"], "data.size"),                              # UNet downsamples by 2^(levels-1) = 4
    (["model.channel_mult=[1,2,2,2]", "data.size=12"], "model.channel_mult"),
    (["model=mmdit", "data.size=15"], "model.patch_size"),
    (["model=mmdit", "model.patch_size=4", "data.size=18"], "model.patch_size"),
    (["model.heads=3"], "model.heads"),
    (["model=mmdit", "model.heads=3"], "model.heads"),
    (["model.channels=abc"], "model.channels"),
    (["+model.bogus=1"], "model.bogus"),
    (["+objective.prediction=v"], "objective.prediction"),        # flow predicts velocity only
    (["objective=ddpm", "objective.prediction=noise"], "objective.prediction"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=-5"], "train.steps"),
    (["train.save_every=0"], "train.save_every"),
    (["train.log_every=0"], "train.log_every"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=fast"], "train.lr"),
    (["train.cond_drop=1.5"], "train.cond_drop"),
    (["train.ema_decay=-0.1"], "train.ema_decay"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["data=imagefolder"], "data.path"),
    (["data=imagefolder", "data.path=/no/such/folder"], "data.path=/no/such/folder"),
    (["text_encoder=hf"], "text_encoder.path"),
    (["resume=/no/such/run"], "resume=/no/such/run"),
]


@pytest.mark.parametrize("overrides,key", TRAIN_ERRORS, ids=[" ".join(o) for o, _ in TRAIN_ERRORS])
def test_train_config_errors_name_the_key(tmp_path, overrides, key):
    cfg = _cfg("train", [*overrides, f"run_dir={tmp_path}"])
    with pytest.raises(DiffxError) as e:
        validate(cfg, "train")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_a_latent_whose_required_path_is_missing_or_wrong_fails(tmp_path):
    """``latent=vae`` needs its checkpoint: any part's ``path: ???`` is required, a set path must exist."""
    cfg = _cfg("train", [f"run_dir={tmp_path}"])
    cfg.latent = OmegaConf.create({"_target_": "diffx.latent.Identity", "path": "???"})
    with pytest.raises(DiffxError, match="latent.path is required"):
        validate(cfg, "train")
    cfg.latent.path = str(tmp_path / "vae.safetensors")
    with pytest.raises(DiffxError, match="latent.path=.*vae.safetensors: no such file"):
        validate(cfg, "train")


@pytest.mark.parametrize("model", ["unet", "mmdit", "mmdit_s", "mmdit_b"])
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_every_shipped_model_and_objective_validates(tmp_path, model, objective):
    validate(_cfg("train", [f"model={model}", f"objective={objective}", f"run_dir={tmp_path}"]), "train")


SAMPLE_ERRORS = [
    (["n=0"], "n=0"), (["steps=0"], "steps=0"), (["cfg=-1"], "cfg=-1"), (["batch_size=0"], "batch_size=0"),
    (["seed=-1"], "seed=-1"), (["overwrite=maybe"], "overwrite"), ([], "ckpt is required"),
    (["ckpt=/no/such/model.safetensors"], "/no/such/model.safetensors"),
]


@pytest.mark.parametrize("overrides,key", SAMPLE_ERRORS, ids=[" ".join(o) or "no ckpt" for o, _ in SAMPLE_ERRORS])
def test_sample_config_errors_name_the_key(overrides, key):
    with pytest.raises(DiffxError, match=key.replace("?", r"\?")):
        validate(_cfg("sample", overrides), "sample")


# --- the CLI: exit code != 0 and exactly one line on stderr, no trace ---------------------------------

@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    """An unconditional checkpoint (no classes), built and saved without training."""
    cfg = _cfg("train", TINY_TRAIN)
    spec = DataSpec(channels=3, image_size=8)
    path = tmp_path_factory.mktemp("uncond") / "model.safetensors"
    checkpoint.save(path, build(cfg, spec).model.state_dict(), parts_config(cfg), spec, step=0)
    return path


@pytest.fixture(scope="module")
def cli_errors(uncond_ckpt, tmp_path_factory):
    """Every failing command at once (each is a process start): name -> (args, returncode, stderr)."""
    cwd = tmp_path_factory.mktemp("cli")
    cases = {
        "unknown model option": (["train", "model=foo"], "model=foo", "mmdit, mmdit_b, mmdit_s, unet"),
        "bad key": (["train", "train.stepz=3"], "train.stepz", "steps"),
        "prediction on flow": (["train", "objective.prediction=v"], "objective.prediction", "objective=ddpm"),
        "size vs downsampling": (["train", "data.size=18"], "data.size", ""),
        "resume without state": (["train", f"resume={cwd}"], f"resume={cwd}", "no resume state"),
        "bad override syntax": (["train", "train.steps=[1"], "[1", ""),
        "missing checkpoint": (["sample", f"ckpt={cwd / 'nope.safetensors'}"], "nope.safetensors", ""),
        "cfg on unconditional": (["sample", f"ckpt={uncond_ckpt}", "cfg=3", "n=1", "steps=1", f"out={cwd}"],
                                 "cfg=3", "unconditional"),
        "verbose": (["train", "data.size=18", "--verbose"], "Traceback", "DiffxError"),
    }
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = {name: subprocess.Popen([DIFFX, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (args, *_) in cases.items()}
    results = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        results[name] = (cases[name], proc.returncode, err)
    return cwd, results


CLI_CASES = ["unknown model option", "bad key", "prediction on flow", "size vs downsampling", "resume without state",
             "bad override syntax", "missing checkpoint", "cfg on unconditional"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_user_error_is_one_line(cli_errors, name):
    cwd, results = cli_errors
    (args, *words), code, err = results[name]
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"diffx {args[0]}: error: ")
    assert all(w in err for w in words), err


def test_cli_leaves_no_run_dir_behind_for_a_bad_config(cli_errors):
    cwd, _ = cli_errors
    runs = cwd / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_cli_verbose_shows_the_trace(cli_errors):
    (_, *words), code, err = cli_errors[1]["verbose"]
    assert code != 0 and all(w in err for w in words), err


# --- outputs and run dirs are never clobbered ------------------------------------------------------

def test_sample_refuses_existing_pngs_unless_overwrite(tiny_run, tmp_path):
    from diffx.sample import sample

    args = [f"ckpt={tiny_run / 'model.safetensors'}", "n=1", "steps=1", f"out={tmp_path}", "device=cpu"]
    first = sample(_cfg("sample", args))
    before = first[0].read_bytes()
    with pytest.raises(DiffxError, match="seed000000.png already exists.*overwrite=true"):
        sample(_cfg("sample", args))
    assert first[0].read_bytes() == before
    sample(_cfg("sample", [*args, "overwrite=true"]))


def test_resume_continues_from_the_saved_step(tiny_run, tmp_path):
    from diffx.train import train

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = _train_cfg(tmp_path, tiny_run, "train.steps=3", f"resume={run}")
    validate(cfg, "train")
    train(cfg)
    assert checkpoint.read(run / "model.safetensors").step == 3
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # steps 1-2 from the first run, only step 3 trained now


def test_a_run_dir_with_a_model_but_no_state_is_refused_not_overwritten(tiny_run, tmp_path):
    from diffx.train import train

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "state")
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(DiffxError, match="refusing to overwrite"):
        train(_train_cfg(tmp_path, tiny_run))
    assert (run / "model.safetensors").read_bytes() == before


def test_two_runs_started_in_the_same_second_get_different_dirs():
    code = "from diffx.config import run_dir; print(run_dir('runs', None))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    dirs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert len(set(dirs)) == 4 and all(d.startswith("runs/") for d in dirs)


# --- data ------------------------------------------------------------------------------------------

def test_an_empty_image_folder_or_a_wrong_path_names_the_path(tmp_path):
    with pytest.raises(DiffxError, match=str(tmp_path)):
        data.imagefolder(str(tmp_path))
    with pytest.raises(DiffxError, match="data.path=.*nowhere"):
        data.imagefolder(str(tmp_path / "nowhere"))


def test_a_corrupt_image_is_skipped_with_a_warning_or_fails_by_config(tmp_path):
    for i in range(2):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        held = data.imagefolder(str(tmp_path), size=8, on_error="skip")
    assert len(held.dataset) == 2
    with warnings.catch_warnings(), pytest.raises(DiffxError, match="broken.png"):
        data.imagefolder(str(tmp_path), size=8, on_error="raise")


# --- numerics --------------------------------------------------------------------------------------

def test_a_nan_loss_stops_training_naming_the_steps(tiny_run, tmp_path):
    from diffx.train import train

    # lr=1e30: Adam's first step moves the weights by ~1e30, so the next loss overflows.
    cfg = _train_cfg(tmp_path, tiny_run, "train.lr=1e30", "train.log_every=2", "train.grad_clip=0")
    with pytest.raises(DiffxError, match=r"loss became (nan|inf) between steps 1 and 2"):
        train(cfg)


@pytest.mark.parametrize("command,config", [("train", "train"), ("train-vae", "train_vae")])
def test_fp16_on_the_cpu_is_refused_in_one_line(command, config):
    """Accelerate would quietly train in float32 while the run says fp16."""
    with pytest.raises(DiffxError, match="train.mixed_precision=fp16 needs a CUDA GPU") as e:
        validate(_cfg(config, ["train.mixed_precision=fp16", "train.cpu=true"]), command)
    assert "\n" not in str(e.value)
