"""diffx's training step makes no host syncs except at ``train.log_every``: counted as calls of
``aten::_local_scalar_dense`` (what ``.item()``, ``float(t)``, ``if t:`` reach) over the real
``diffx.train.train`` loop, step by step."""

from __future__ import annotations

import traceback

import pytest
import torch
from conftest import compose_config
from torch.utils._python_dispatch import TorchDispatchMode

import diffx.train as train_module

LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


class SyncCounter(TorchDispatchMode):
    """Counts scalar reads of tensors, with where each came from. Reads inside the DataLoader's fetch
    are left out: they are of host tensors on the host (the dataset's labels; in worker processes
    with train.num_workers > 0), never of the device's."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is LOCAL_SCALAR:
            stack = traceback.extract_stack()
            if not any("torch/utils/data/" in f.filename for f in stack):
                self.calls.append(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in stack[-8:-2]))
        return func(*args, **(kwargs or {}))


def _syncs_per_step(monkeypatch, tmp_path, overrides, steps=6, log_every=3) -> dict[int, list[str]]:
    """The scalar reads between the end of step k and the end of step k + 1 (the next step's forward,
    backward, clipping, optimizer step and EMA, and step k's logging and save checks), by k."""
    counter, marks = SyncCounter(), []

    class Progress(train_module.TrainProgress):
        def advance(self, step):
            marks.append((step, len(counter.calls)))
            return super().advance(step)

    monkeypatch.setattr(train_module, "TrainProgress", Progress)
    cfg = compose_config("train", ["data.size=16", "data.n=64", f"data.cache_dir={tmp_path / 'cache'}",
                                   f"train.steps={steps}", "train.batch_size=8", "train.warmup=2",
                                   f"train.log_every={log_every}", "train.save_every=100",
                                   f"run_dir={tmp_path / 'run'}", *overrides])
    with counter:
        train_module.train(cfg)
    return {k: counter.calls[n:m] for (k, n), (_, m) in zip(marks, marks[1:])}


TINY_UNET = ["model=unet", "model.channels=16"]
TINY_MMDIT = ["model=mmdit", "model.width=16", "model.depth=1", "model.heads=2", "model.patch_size=4"]
TINY_TEXT = ["text_encoder=tiny", "text_encoder.width=16", "text_encoder.depth=1", "text_encoder.heads=2"]


@pytest.mark.parametrize("overrides", [TINY_UNET, TINY_MMDIT + TINY_TEXT, TINY_UNET + ["train.grad_accum=2"]],
                         ids=["unet-labels", "mmdit-text", "unet-accumulation"])
def test_no_host_sync_between_log_steps(monkeypatch, tmp_path, overrides):
    per_step = _syncs_per_step(monkeypatch, tmp_path, overrides)
    quiet = {k: calls for k, calls in per_step.items() if k % 3 != 0}  # after a non-logging step
    assert sorted(quiet) == [1, 2, 4, 5]
    assert all(not calls for calls in quiet.values()), {k: c[:3] for k, c in quiet.items() if c}


def test_the_counter_sees_the_for_each_adamw_read_its_step_counts(monkeypatch, tmp_path):
    """The control: the non-fused AdamW reads each parameter's step count on the host."""
    per_step = _syncs_per_step(monkeypatch, tmp_path, TINY_UNET + ["optimizer.fused=false"], steps=3, log_every=3)
    assert len(per_step[1]) > 10 and any("adam" in c for c in per_step[1])
