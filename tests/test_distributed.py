"""Several processes train as one run: ``torchrun --nproc_per_node 2 -m diffx train`` on the CPU (gloo)
writes one run directory, from the main process only, and ends with the weights of a 1-process run
whose batch is the two processes' together; its state resumes on 1 process at the same images per round
and is refused at any other."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN, compose_config
from diffx import checkpoint
from diffx.errors import DiffxError

TORCHRUN = Path(sys.executable).with_name("torchrun")
B = 4  # train.batch_size per process; the 1-process runs take 2 x B
# 16 images, 8 a round: step 3 starts the second epoch, so the epoch's reshuffle is compared too. Adam's
# eps is raised from 1e-8: Adam scales each step to about lr whatever the gradient's size, so on weights
# whose gradient is ~0 (zero-initialised output layers) it would blow the all-reduce's float rounding
# up to lr-sized differences.
COMMON = [o for o in TINY_TRAIN if not o.startswith(("train.batch_size", "train.steps", "train.save_every"))] + [
    "+optimizer.eps=1e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A 3-step run of 2 CPU processes of batch B through torchrun: (cwd, its run dir, its output)."""
    cwd = tmp_path_factory.mktemp("torchrun")
    proc = launch([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                   str(free_port()), "-m", "diffx", "train", *COMMON, f"train.batch_size={B}", "train.steps=3",
                   "train.save_every=3", "train.cpu=true", "out=runs", f"data.cache_dir={cwd / 'cache'}"], cwd)
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, f"one run dir for both processes, got {[r.name for r in runs]}"
    return cwd, runs[0], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run on 1 process with batch 2 x B, straight to step 5, keeping the states of steps 3 and 5."""
    from diffx.train import train

    root = tmp_path_factory.mktemp("one")
    return train(compose_config("train", COMMON + [f"train.batch_size={2 * B}", "train.steps=5", "train.save_every=3",
                                                   "train.keep_last=2", f"run_dir={root / 'run'}",
                                                   f"data.cache_dir={root / 'cache'}"]))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:  # the same sums in another order (gloo's all-reduce): float rounding only
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_both_processes_write_one_run_dir_once(two_processes):
    _, run, output = two_processes
    assert [p.name for p in (run / ".hydra").iterdir()] == [run.name]  # Hydra's files, from the main process
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert output.count("training UNet") == 1 and output.count(f"saved {run / 'model.safetensors'}") == 1
    meta = json.loads((run / "state" / "trainer.json").read_text())
    assert (meta["step"], meta["world_size"], meta["batch_size"]) == (3, 2, B)


def test_two_processes_end_with_the_weights_of_one_with_twice_the_batch(two_processes, one_process):
    _, run, _ = two_processes
    at_3 = one_process / "state-3"  # the 1-process run at step 3
    assert_same(load_file(str(run / "state" / "model.safetensors")), load_file(str(at_3 / "model.safetensors")))
    assert_same(checkpoint.read(run / "model.safetensors").weights, load_file(str(at_3 / "ema.safetensors")))
    losses = [[json.loads(line)["loss"] for line in (r / "log.jsonl").read_text().splitlines()[:3]]
              for r in (run, one_process)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the mean over both processes is logged


def test_a_two_process_state_resumes_on_one_process(two_processes, one_process, tmp_path):
    from diffx.train import train

    cwd, run, _ = two_processes
    shutil.copytree(run, tmp_path / "run")
    resumed = train(compose_config("train", COMMON + [f"train.batch_size={2 * B}", "train.steps=5",
                                                      f"run_dir={tmp_path / 'run'}", f"data.cache_dir={cwd / 'cache'}"]))
    assert_same(load_file(str(resumed / "state" / "model.safetensors")),
                load_file(str(one_process / "state-5" / "model.safetensors")))
    assert_same(checkpoint.read(resumed / "model.safetensors").weights, checkpoint.read(one_process / "model.safetensors").weights)


def test_resuming_with_other_images_per_round_is_refused(two_processes, tmp_path):
    from diffx.train import train

    cwd, run, _ = two_processes
    shutil.copytree(run, tmp_path / "run")
    with pytest.raises(DiffxError) as e:
        train(compose_config("train", COMMON + [f"train.batch_size={B}", "train.steps=5", f"run_dir={tmp_path / 'run'}",
                                                f"data.cache_dir={cwd / 'cache'}"]))
    message = str(e.value)
    assert "\n" not in message
    for words in ("2 processes x train.batch_size=4", "1 process x train.batch_size=4", "train.batch_size=8"):
        assert words in message, message


# Prints what this process agreed on, then waits for stdin to close: rank 0 serves the answer while it
# runs, as a training run does (at least until the process group forms, which waits for every rank).
_AGREE = "import sys; from diffx.config import run_id, on_main; print(run_id(), on_main('main'), flush=True); sys.stdin.read()"


def test_processes_agree_on_the_run_id_without_torchrun(tmp_path):
    """Launchers other than torchrun (srun, mpirun, by hand) set only RANK, WORLD_SIZE and MASTER_*:
    rank 0 serves the answer on MASTER_PORT + 1."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port() - 1)}
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(rank)}) for rank in (1, 0)]
    try:
        (id1, main1), (id0, main0) = (p.stdout.readline().split() for p in procs)
    finally:
        for p in procs:
            p.communicate(timeout=60)
    assert id0 == id1 and (main0, main1) == ("main", "None")
