"""Preemption: SIGTERM, SIGINT or SIGUSR1 stops a training run after the current step, with a resume
state saved at that step, one line on how to resume, and exit code 128 + signal; resuming then ends
with the weights of a run that was never interrupted, bit for bit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_TRAIN, compose_config
from safetensors.torch import load_file

import diffx.train
import diffx.train_vae
from diffx.preemption import Preempted, Preemption

# The tiny UNet run of conftest, long enough to be signalled mid-run (about 1-2 s of steps).
STEPS = 80
RUN = TINY_TRAIN + ["data.n=64", f"train.steps={STEPS}", "train.save_every=1000"]
# A tiny factor-4 autoencoder on 16x16 shapes.
VAE_RUN = ["data.size=16", "data.n=24", "train.batch_size=8", "train.warmup=0", "train.log_every=1",
           "train.save_every=1000", "train.holdout=8", "train.steps=4", "train.ema_decay=0.9", "autoencoder=kl_f4",
           "autoencoder.channels=8"]


def _diffx(*args, **kwargs) -> subprocess.Popen:
    """The installed ``diffx`` command, on one thread, its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([shutil.which("diffx"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def _train_and_signal(run_dir, overrides, signum: int, after: int) -> str:
    """Start ``diffx train`` into ``run_dir``, send ``signum`` once its log shows ``after`` steps; its stderr."""
    proc = _diffx("train", *overrides, f"run_dir={run_dir}")
    log, deadline = run_dir / "log.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= after:
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    return err


def _same_weights(a, b) -> None:
    for file in ("model.safetensors", "state/model.safetensors", "state/ema.safetensors"):
        x, y = load_file(str(a / file)), load_file(str(b / file))
        assert x.keys() == y.keys(), file
        assert all((x[k] == y[k]).all() for k in x), f"{file} differs"


def _trainer(run_dir) -> dict:
    return json.loads((run_dir / "state" / "trainer.json").read_text())


def test_sigterm_saves_at_the_step_and_resumes_bit_identically(tmp_path):
    """A real ``diffx train`` process, sent SIGTERM once its log shows 3 steps: it exits 143 after a step
    k < STEPS, with a resume state and model.safetensors at k, and one line naming the resume command.
    Resumed to the end, it holds the same weights as an uninterrupted run, bit for bit."""
    common = [*RUN, f"data.cache_dir={tmp_path / 'cache'}"]
    run = tmp_path / "stopped"
    err = _train_and_signal(run, common, signal.SIGTERM, after=3)  # exit code 143
    step = _trainer(run)["step"]
    assert 3 <= step < STEPS
    assert load_file(str(run / "model.safetensors"))  # a readable checkpoint, at the same step:
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == step
    lines = [line for line in err.splitlines() if "resume=" in line]
    assert lines == [f"diffx train: stopped by SIGTERM after step {step}, resume state saved; "
                     f"continue with: diffx train resume={run}"]
    assert err.strip().splitlines()[-1] == lines[0]  # the last line the user sees

    resumed = _diffx("train", *common, f"resume={run}")
    diffx.train.train(compose_config("train", [*common, f"run_dir={tmp_path / 'straight'}"]))  # meanwhile, here
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _trainer(run)["step"] == STEPS
    _same_weights(run, tmp_path / "straight")


def test_sigint_in_training_exits_130_after_saving(tmp_path):
    run = tmp_path / "run"
    err = _train_and_signal(run, [*RUN, f"data.cache_dir={tmp_path / 'cache'}"], signal.SIGINT, after=2)  # 130
    step = _trainer(run)["step"]
    assert err.strip().splitlines()[-1].startswith(f"diffx train: stopped by SIGINT after step {step}, ")
    assert "Traceback" not in err and "interrupted" not in err


_SLOW_TASK = """
import signal, sys, time
# As from a terminal: a non-interactive shell's background job (CI run with &) starts with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
import diffx.train
def slow(cfg):
    print("ready", flush=True)
    time.sleep(120)
diffx.train.train = slow  # the CLI looks the task up when the job starts
from diffx.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_sigint_outside_the_training_loop_prints_one_line(tmp_path):
    """Outside the loop SIGINT keeps Python's handler: the CLI turns the KeyboardInterrupt into one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TASK, f"run_dir={tmp_path / 'run'}"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["diffx train: interrupted"]


# --- in-process: each command, a second signal while saving, the handler itself -------------------

class _SignalAt:
    """Sends ``signum`` to this process when the loop reports step ``at`` (``TrainProgress.advance``),
    and again from inside the first state save: a second signal while saving."""

    def __init__(self, module, monkeypatch, signum: int, at: int):
        progress, save_state = module.TrainProgress, module.save_state
        self.saves = 0

        class Progress(progress):
            def advance(inner, step):
                super().advance(step)
                if step == at:
                    os.kill(os.getpid(), signum)

        def save_and_signal(*args, **kwargs):
            self.saves += 1
            os.kill(os.getpid(), signum)
            save_state(*args, **kwargs)

        monkeypatch.setattr(module, "TrainProgress", Progress)
        monkeypatch.setattr(module, "save_state", save_and_signal)


@pytest.mark.parametrize("command,signum", [("train", signal.SIGUSR1), ("train-vae", signal.SIGTERM)])
def test_each_command_stops_saved_and_resumes_exactly(tmp_path, monkeypatch, capfd, command, signum):
    module, conf, base = {"train": (diffx.train, "train", TINY_TRAIN + ["train.steps=4", "train.save_every=1000"]),
                          "train-vae": (diffx.train_vae, "train_vae", VAE_RUN)}[command]
    task = getattr(module, command.replace("-", "_"))
    base = [*base, f"data.cache_dir={tmp_path / 'cache'}"]
    task(compose_config(conf, base + [f"run_dir={tmp_path / 'straight'}"]))

    with monkeypatch.context() as m:
        signals = _SignalAt(module, m, signum, at=2)
        previous = signal.getsignal(signum)
        with pytest.raises(Preempted) as e:
            task(compose_config(conf, base + [f"run_dir={tmp_path / 'stopped'}"]))
        assert signal.getsignal(signum) == previous  # the handler is uninstalled on the way out
    assert e.value.code == 128 + signum and signals.saves == 1
    err = capfd.readouterr().err
    assert "received while stopping; still saving" in err  # the second signal changed nothing
    assert err.strip().splitlines()[-1] == (f"diffx {command}: stopped by {signal.Signals(signum).name} after "
                                            f"step 2, resume state saved; continue with: diffx {command} "
                                            f"resume={tmp_path / 'stopped'}")
    assert _trainer(tmp_path / "stopped")["step"] == 2

    task(compose_config(conf, base + [f"run_dir={tmp_path / 'stopped'}", f"resume={tmp_path / 'stopped'}"]))
    weights = "model.safetensors" if command == "train" else "vae.safetensors"
    a, b = (load_file(str(tmp_path / run / weights)) for run in ("stopped", "straight"))
    assert all((a[k] == b[k]).all() for k in a)
    x, y = (load_file(str(tmp_path / run / "state" / "model.safetensors")) for run in ("stopped", "straight"))
    assert all((x[k] == y[k]).all() for k in x)


class _OneProcess:
    num_processes = 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_only_sets_the_flag_and_picks_the_exit_code(signum):
    previous = signal.getsignal(signum)
    with Preemption() as preemption:
        assert not preemption.requested(_OneProcess(), sync=True)
        os.kill(os.getpid(), signum)  # handled in this thread before the next line runs
        assert preemption.requested(_OneProcess(), sync=False)
        stop = preemption.stopped("train", "runs/x", 7)
    assert signal.getsignal(signum) == previous
    assert stop.code == {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 138}[signum]
    assert stop.message.endswith("continue with: diffx train resume=runs/x")
    assert preemption.stopped("train", "runs/x", 7, main=False).message is None
