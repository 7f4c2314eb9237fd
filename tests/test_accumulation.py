"""Memory and speed options of ``diffx train``: gradient accumulation, torch.compile, bf16 on the CPU,
and their start-up checks. (Activation checkpointing is tested per model in test_models.py.)"""

import json
import zlib

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_TRAIN, compose_config
from safetensors.torch import load_file

import diffx.train
from diffx.errors import DiffxError
from diffx.validate import validate


def _train(tmp_path, name, overrides):
    cfg = compose_config("train", TINY_TRAIN + [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / name}",
                                                *overrides])
    return diffx.train.train(cfg)


def _row_seeded(loss):
    """The objective's loss with each sample's t and noise drawn from a generator seeded by the sample's
    own pixels, in place of the loop's draws (made per micro-batch round): the draws no longer depend on
    how the samples are split into batches."""

    def per_row(model, x0, cond=None, generator=None, t=None, noise=None):
        if t is None:  # not the training loop's call (the end-of-run probe): unchanged
            return loss(model, x0, cond, generator=generator)
        rows = []
        for i in range(x0.shape[0]):
            seed = zlib.crc32(x0[i].numpy().tobytes())
            row_cond = None if cond is None else {k: v[i: i + 1] for k, v in cond.items()}
            rows.append(loss(model, x0[i: i + 1], row_cond, generator=torch.Generator().manual_seed(seed)))
        return torch.cat(rows)

    return per_row


def test_accumulated_micro_batches_give_the_weights_of_one_large_batch(tmp_path, monkeypatch):
    """K=2 micro-batches of 4 and single batches of 8 see the same images per optimizer step (the same
    shuffled order, 16 images: 2 steps per epoch, so step 3 starts the next epoch), and the same noise
    (seeded per image, above): the weights, EMA, logged losses and learning rates agree to round-off.
    Plain SGD, whose update is linear in the gradient: Adam's first steps divide each gradient by its
    own size, which turns the round-off of a near-zero gradient (a zero-initialised bias) into a whole
    step of lr in either direction."""
    build = diffx.train.build

    def build_row_seeded(cfg, spec):
        parts = build(cfg, spec)
        parts.objective.loss = _row_seeded(parts.objective.loss)
        return parts

    monkeypatch.setattr(diffx.train, "build", build_row_seeded)
    common = ["data.n=16", "train.steps=3", "train.warmup=2", "train.cond_drop=0", "train.save_every=3",
              "train.ema_decay=0.9", "optimizer._target_=torch.optim.SGD", "~optimizer.betas", "train.lr=0.1"]
    small = _train(tmp_path, "small", common + ["train.batch_size=4", "train.grad_accum=2"])
    large = _train(tmp_path, "large", common + ["train.batch_size=8", "train.grad_accum=1"])

    for file in ("state/model.safetensors", "state/ema.safetensors", "model.safetensors"):
        a, b = load_file(str(small / file)), load_file(str(large / file))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{file}: {k}")
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (small, large)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert [json.loads((run / "state" / "trainer.json").read_text())["ema_updates"] for run in (small, large)] == [3, 3]


def test_every_optimizer_step_takes_grad_accum_micro_batches_across_epoch_ends(tmp_path):
    """12 images in micro-batches of 4: an epoch ends after 3 micro-batches, inside an accumulation
    window. Accelerate would, by default, step the optimizer early there (and then skip a step); each
    of the 4 optimizer steps must take exactly 2 micro-batches: 8 micro-batches, 4 real Adam updates."""
    run = _train(tmp_path, "run", ["data.n=12", "train.batch_size=4", "train.grad_accum=2", "train.steps=4",
                                   "train.save_every=4"])
    state = torch.load(run / "state" / "optimizer.pt", weights_only=True)["state"]
    assert {int(s["step"]) for s in state.values()} == {4}


def test_accumulated_run_resumes_exactly(tmp_path):
    """The data position of a resumed run counts micro-batches: stopping at step 2 of 4 and resuming
    gives the straight run's weights, bit for bit."""
    common = ["data.n=12", "train.batch_size=4", "train.grad_accum=2", "train.save_every=2"]
    straight = _train(tmp_path, "a", common + ["train.steps=4"])
    _train(tmp_path, "b", common + ["train.steps=2"])
    resumed = _train(tmp_path, "b", common + ["train.steps=4"])
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_saves_plain_weight_names(tmp_path):
    """``train.compile=true``: the checkpoint, the EMA and the resume state hold the model's own weight
    names (no ``_orig_mod.``), the same as an uncompiled run's, and the run resumes. The CPU inductor
    backend takes over a minute to compile even this model here, so the test traces with
    ``aot_eager``, which goes through the same capture and autograd tracing without generating code."""
    compiled = ["train.compile=true", "train.compile_backend=aot_eager", "train.grad_accum=2",
                "model.checkpointing=true"]
    from torch._dynamo.utils import counters

    plain = _train(tmp_path, "plain", [])
    counters.clear()
    run = _train(tmp_path, "compiled", compiled)
    assert counters["stats"]["unique_graphs"] >= 1  # the loss did go through torch.compile
    for file in ("model.safetensors", "state/model.safetensors", "state/ema.safetensors"):
        names = set(load_file(str(run / file)))
        assert names == set(load_file(str(plain / file))), file
        assert not any("_orig_mod" in k for k in names), file
    assert "_orig_mod" not in (run / "state" / "trainer.json").read_text()
    resumed = _train(tmp_path, "compiled", compiled + ["train.steps=3"])
    assert json.loads((resumed / "state" / "trainer.json").read_text())["step"] == 3


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process and refuses another mixed precision once it is set:
    forget it before and after a test that trains with another precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path, capsys, fresh_accelerate_state):
    """Accelerate runs the forward under CPU autocast in bf16: the losses differ from float32's by bf16's
    round-off, not more, and the weights (and checkpoint) stay float32."""
    runs = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        runs[precision] = _train(tmp_path, precision, [f"train.mixed_precision={precision}", "train.cpu=true",
                                                       "model.checkpointing=true"])
    assert "precision bf16" in capsys.readouterr().out
    losses = {p: [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
              for p, run in runs.items()}
    assert losses["bf16"] != losses["no"] and losses["bf16"] == pytest.approx(losses["no"], rel=5e-2)
    weights = load_file(str(runs["bf16"] / "model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("override,key", [
    ("train.grad_accum=0", "train.grad_accum=0"),
    ("train.grad_accum=1.5", "train.grad_accum=1.5"),
    ("train.compile=maybe", "train.compile=maybe"),
    ("train.keep_freed_memory=sometimes", "train.keep_freed_memory=sometimes"),
    ("train.compile_backend=nope", "train.compile_backend=nope"),
    ("model.checkpointing=2", "model.checkpointing=2"),
])
def test_bad_option_values_fail_at_start_up(override, key):
    cfg = compose_config("train", TINY_TRAIN + [override] + (["train.compile=true"] if "backend" in key else []))
    with pytest.raises(DiffxError, match=key.replace(".", r"\.")):
        validate(cfg, "train")
