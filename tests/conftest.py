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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
