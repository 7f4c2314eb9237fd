import pytest
import torch

from diffx import schedules
from diffx.objectives import DDPM, Flow
from diffx import time_sampling

FAMILIES = {"ddpm": DDPM, "flow": Flow}
SCHEDULE_NAMES = {"linear": schedules.linear, "cosine": schedules.cosine}


def make_objective(family: str, schedule: str, **kwargs):
    sched = SCHEDULE_NAMES[schedule](family)
    return FAMILIES[family](sched, time_sampling.uniform, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """One intra-op thread for the whole suite: the test tensors are tiny, so extra threads only add
    overhead, which turns into minutes of spinning when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GPU_SKIP = "needs CUDA"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A test may skip for hardware only. `make test` installs every package the suite needs (the `dev`
# extra), so a skip for any other reason -- a missing package, a missing command -- fails the run:
# otherwise a fresh machine would silently test less than CI did.
_UNEXPECTED_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if GPU_SKIP not in reason:
            _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _UNEXPECTED_SKIPS:
        terminalreporter.section("skips that are not for hardware (failing the run)")
        for line in _UNEXPECTED_SKIPS:
            terminalreporter.write_line(line)


# A seconds-long CPU train: a 2-level UNet 8 channels wide on 8x8 shapes, two steps.
TINY_TRAIN = ["data.size=8", "data.n=16", "train.batch_size=8", "train.steps=2", "train.warmup=0",
              "train.log_every=1", "train.save_every=2", "model.channels=8", "model.channel_mult=[1,2]",
              "model.attn_resolutions=[]"]


def compose_config(name: str, overrides=()):
    """Compose the real config tree ``conf/<name>.yaml`` with ``overrides``, as the CLI does."""
    from hydra import compose, initialize_config_dir

    from diffx.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(name, overrides=list(overrides))


def perturb_all(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every weight off its (zero) init, so signal reaches the output from every parameter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def saved_random_model(cfg, spec, path, step: int):
    """Build the parts of ``cfg`` for ``spec``, give every weight random values (so a round trip that
    loses or misplaces one shows), save them as a checkpoint at ``path``; returns the parts."""
    from diffx import checkpoint
    from diffx.build import build, parts_config

    parts = build(cfg, spec)
    with torch.no_grad():
        for p in parts.model.parameters():
            p.normal_()
    checkpoint.save(path, parts.model.state_dict(), parts_config(cfg), spec, step=step)
    return parts


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real run directory (model.safetensors + resume state) from a 2-step CPU train of a tiny UNet
    on 8x8 shapes; built once per session. Copy it before changing anything in it."""
    from diffx.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    return train(compose_config("train", TINY_TRAIN + [f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}"]))
