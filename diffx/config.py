"""Where the config tree lives and the resolvers it uses (which classes it may name where: ``diffx.trust``)."""

from __future__ import annotations

import functools
import os
import time
import uuid
from pathlib import Path

import yaml
from omegaconf import OmegaConf


def config_dir() -> Path:
    """``conf/`` beside the package in a source checkout, else the copy a wheel installs as ``diffx/conf``
    (pyproject.toml maps it there)."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"diffx's config tree is missing: neither {package.parent / 'conf'} nor {package / 'conf'}")


def options_with_key(group: str, key: str) -> list[str]:
    """The options of config group ``group`` (``"objective"``) whose YAML has top-level ``key``:
    lets an error about ``objective.prediction`` say which option has it."""
    folder = config_dir() / group
    found = []
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        node = yaml.safe_load(path.read_text())
        if isinstance(node, dict) and key in node:
            found.append(path.stem)
    return found


# This process's own id: two runs started in the same second still get different directories.
_OWN_ID = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 100000:05d}{uuid.uuid4().hex[:4]}"

# Where launchers put a process's rank and the number of processes, in the order Accelerate reads them:
# torchrun (which accelerate launch runs) sets the first, MPI launchers the others.
_RANK_KEYS = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
_WORLD_KEYS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")
AUTO = "auto"  # resume=auto: continue the newest run under out= with this config, or start one


def run_id() -> str:
    """The run's id: this process's own or, when a launcher started several, the main process's."""
    return agreed("run_id", lambda: _OWN_ID)


def run_dir(out: str, resume: str | None, _root_=None) -> str:
    """The run directory: the one being resumed, else a new unique one under ``out``.

    ``resume=auto`` picks the newest run under ``out`` whose stored config equals this one (``_root_``,
    the whole config, passed by OmegaConf), else a new one. Any other ``resume`` must name a run with
    a resume state; checked here, where Hydra asks for the directory, so that a wrong path fails
    before Hydra writes its files into it."""
    if resume == AUTO:
        from diffx.resume import newest_run

        return agreed("run_dir", lambda: str(newest_run(Path(out), _root_) or f"{out}/{run_id()}"))
    if resume:
        from diffx.resume import check_resumable

        check_resumable(resume)
        return str(resume)
    return f"{out}/{run_id()}"


def agreed(name: str, decide) -> str:
    """``decide()``, made once for all the processes of a launch.

    A launcher starts every process with the same arguments, and Hydra picks the run directory
    before any process group exists, so each would pick its own. Instead the main process (rank 0)
    decides and posts the answer in the launch's key-value store (``_launch_store``), and the others
    wait for it there: one run directory for all ranks. Rank 0 keeps an answer already posted, so
    workers that torchrun restarts (``--max_restarts``) continue the first attempt's run.
    """
    world, rank = _env_int(_WORLD_KEYS, 1), _env_int(_RANK_KEYS, 0)
    if world <= 1:
        return decide()
    store, key = _launch_store(rank), f"diffx/{name}"
    if rank == 0 and not store.check([key]):
        store.set(key, decide())
    return store.get(key).decode()


@functools.cache  # one connection per process; on rank 0 of other launchers it also keeps the server up
def _launch_store(rank: int):
    """A TCP key-value store that all processes of the launch reach at ``MASTER_ADDR``.

    torchrun's agent (also behind ``accelerate launch``) serves one at ``MASTER_ADDR:MASTER_PORT``
    before it starts the workers, and says so in ``TORCHELASTIC_USE_AGENT_STORE``; torch's own env://
    rendezvous connects to it the same way. Under other launchers (srun, mpirun, by hand) rank 0
    serves one itself on the next port, ``MASTER_PORT + 1``, which must then be free."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from diffx.errors import DiffxError

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and port.isdigit()):
        raise DiffxError(f"{_env_int(_WORLD_KEYS, 1)} processes were launched without MASTER_ADDR and MASTER_PORT, "
                         "where they agree on one run directory; launch with torchrun or accelerate launch, "
                         "or set both (the main process's address and a free port)")
    timeout = timedelta(minutes=10)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return TCPStore(addr, int(port), is_master=False, timeout=timeout)
    return TCPStore(addr, int(port) + 1, is_master=rank == 0, timeout=timeout, wait_for_workers=False)


def launched_processes() -> int:
    """How many processes the launcher started (1 without one)."""
    return _env_int(_WORLD_KEYS, 1)


def _env_int(keys: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[k]) for k in keys if os.environ.get(k, "").isdigit()), default)


def on_main(value, elsewhere=None):
    """``value`` on the main process (rank 0, or no launcher), ``elsewhere`` on the others: Hydra's own
    files (``.hydra/``, the job log) are written once into a run directory that all ranks share."""
    return value if _env_int(_RANK_KEYS, 0) == 0 else elsewhere


def main_log(path: str) -> str:
    """The job log's path on the main process; the null device on the others (see ``on_main``)."""
    return on_main(path, os.devnull)


def register_resolvers() -> None:
    # Cached: Hydra copies a config's resolver cache into each job of a sweep, so jobs that a launcher
    # runs in other processes (joblib, SLURM) share the sweep folder and run id of the process that started it.
    OmegaConf.register_new_resolver("diffx_run_id", run_id, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("diffx_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("diffx_on_main", on_main, replace=True)
    OmegaConf.register_new_resolver("diffx_main_log", main_log, replace=True)
