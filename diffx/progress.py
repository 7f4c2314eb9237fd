"""Progress a user can see: the training bar, and a line for each piece of start-up work.

In a terminal these are rich live bars. Without one (a cluster job's log file) a live bar never shows,
so plain lines are printed instead: when the work starts, at least every ``PLAIN_EVERY`` seconds while
it runs, and when it ends, so that a slow run is never mistaken for a hung one.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

PLAIN_EVERY = 30.0  # seconds between plain lines without a terminal


class _Rate(ProgressColumn):
    """Steps per second, from rich's own moving estimate (no host sync: it counts steps, not losses)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "- it/s")


class TrainProgress:
    """``with TrainProgress(total) as p: p.advance(step); ...; p.update(step, loss)``.

    ``advance`` runs every step and needs nothing from the device, so the bar, the rate and the ETA
    move from the first steps; ``update`` brings the loss, which is read back only every ``log_every``
    steps. Silent when not enabled (the non-main processes of a distributed run).
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, console: Console | None = None,
                 clock=time.monotonic):
        self.enabled, self.total, self.clock = enabled, total, clock
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), _Rate(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not enabled,
        )
        self.plain = enabled and not self.progress.console.is_terminal
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-")
        self.start_step, self.start_time = start, clock()
        self.last_line = self.start_time
        self.loss: float | None = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    @property
    def completed(self) -> int:
        return int(self.progress.tasks[0].completed)

    def advance(self, step: int) -> None:
        """Step ``step`` is done (every step; no host sync)."""
        self.progress.update(self.task, completed=step)
        if self.plain and (self.clock() - self.last_line >= PLAIN_EVERY or step == self.start_step + 1):
            self._line(step)

    def update(self, step: int, loss: float) -> None:
        """The mean loss of the log window that ends at ``step``."""
        self.loss = loss
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")
        if self.plain:
            self._line(step)

    def rate(self, step: int) -> float:
        """Steps per second since this process started training."""
        elapsed = self.clock() - self.start_time
        return (step - self.start_step) / elapsed if elapsed > 0 else 0.0

    def _line(self, step: int) -> None:
        rate = self.rate(step)
        eta = f"{(self.total - step) / rate:.0f}s" if rate > 0 else "-"
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        self.progress.console.print(f"step {step}/{self.total}  loss {loss}  {rate:.2f} it/s  eta {eta}")
        self.last_line = self.clock()


@contextmanager
def work(description: str, total: int, console: Console | None = None, clock=time.monotonic):
    """A progress line for start-up work of ``total`` items (rendering, decoding, encoding):
    ``with work("decoding images", n) as advance: ... advance(k)``."""
    console = console or Console()
    start = last = clock()
    done = 0
    if console.is_terminal:
        with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda k=1: bar.advance(task, k)
        console.print(f"{description}: {total} in {clock() - start:.1f} s")
        return

    console.print(f"{description}: {total} ...")

    def advance(k: int = 1) -> None:
        nonlocal done, last
        done += k
        if clock() - last >= PLAIN_EVERY:
            console.print(f"{description}: {done}/{total} ({clock() - start:.0f} s)")
            last = clock()

    yield advance
    console.print(f"{description}: {total} in {clock() - start:.1f} s")


def log_line(path, step: int, row: dict) -> None:
    """Append one JSON line ``{"step", **row, "time"}`` to a run's ``log.jsonl`` (main process only)."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **row, "time": time.time()}) + "\n")
