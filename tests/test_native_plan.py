"""A distilled student's native plan (``diffx distill``) is used when the sampler, grid and steps are left
to diffx, and a sampler or grid named in the config wins, whether a command line or a Python caller's
``compose`` named it."""

import pytest

from diffx import schedules
from diffx.generate import sampling_plan
from tests.conftest import compose_config

NATIVE = {"steps": 2, "ts": [1.0, 0.5, 0.0], "method": "progressive"}


@pytest.mark.parametrize("overrides, native", [
    ([], True),
    (["sampler=auto", "grid=auto"], True),
    (["sampler=euler"], False),
    (["grid=uniform"], False),
    (["steps=4"], False),
])
def test_native_plan_unless_chosen(overrides, native):
    cfg = compose_config("sample", ["ckpt=x.safetensors", *overrides])
    plan = sampling_plan(cfg, schedules.FlowLinear(), NATIVE)
    assert (plan.ts.tolist() == NATIVE["ts"]) is native
    if not native and "steps=4" not in overrides:
        assert plan.ts.numel() - 1 != NATIVE["steps"] or plan.ts.tolist() != NATIVE["ts"]


def test_no_native_plan_without_one():
    cfg = compose_config("sample", ["ckpt=x.safetensors"])
    assert sampling_plan(cfg, schedules.FlowLinear(), None).ts.tolist() != NATIVE["ts"]
