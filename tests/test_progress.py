"""What a user sees while diffx works: the bar moves every step, plain lines appear without a terminal."""

import io

from rich.console import Console

from conftest import TINY_TRAIN, compose_config
from diffx import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def plain_console():
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def test_the_bar_advances_before_the_first_log_every_boundary(tmp_path, monkeypatch):
    import diffx.train

    events = []

    class Spy(progress.TrainProgress):
        def advance(self, step):
            super().advance(step)
            events.append(("advance", step, self.completed))

        def update(self, step, loss):
            super().update(step, loss)
            events.append(("loss", step, self.completed))

    monkeypatch.setattr(diffx.train, "TrainProgress", Spy)
    overrides = [o for o in TINY_TRAIN if not o.startswith(("train.steps", "train.log_every", "train.save_every"))]
    diffx.train.train(compose_config("train", overrides + [
        "train.steps=4", "train.log_every=100", "train.save_every=4", f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}"]))
    # the bar shows every step as it finishes; the loss arrives only at the (final) log boundary
    assert events[:4] == [("advance", s, s) for s in (1, 2, 3, 4)]
    assert [e for e in events if e[0] == "loss"] == [("loss", 4, 4)]


def test_without_a_terminal_a_plain_line_comes_at_least_every_30_s():
    clock, console = Clock(), plain_console()
    with progress.TrainProgress(100, console=console, clock=clock) as bar:
        for step in range(1, 101):
            clock.now += 7.0  # a slow run: 7 s a step, no loss logged for 100 steps
            bar.advance(step)
    lines = [ln for ln in console.file.getvalue().splitlines() if ln.startswith("step ")]
    assert lines[0].startswith("step 1/100") and "eta" in lines[0]
    assert len(lines) >= 700 // 35  # a line once 30 s have passed, i.e. after at most one more step
    steps = [int(ln.split()[1].split("/")[0]) for ln in lines]
    assert all(b - a <= 5 for a, b in zip(steps, steps[1:]))  # 5 steps = 35 s


def test_rate_and_eta_come_from_the_step_count():
    clock, console = Clock(), plain_console()
    with progress.TrainProgress(10, console=console, clock=clock) as bar:
        clock.now = 2.0
        bar.advance(1)
    assert bar.rate(1) == 0.5
    assert "0.50 it/s  eta 18s" in console.file.getvalue()


def test_start_up_work_prints_start_progress_and_end_without_a_terminal():
    clock, console = Clock(), plain_console()
    with progress.work("decoding 10 images", 10, console=console, clock=clock) as advance:
        for _ in range(10):
            clock.now += 10.0
            advance()
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "decoding 10 images: 10 ..."
    assert any("/10" in ln for ln in lines[1:-1])  # a line at least every 30 s
    assert lines[-1].startswith("decoding 10 images: 10 in 100.0 s")
