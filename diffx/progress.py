"""A rich progress bar for training: step, loss, it/s and ETA."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """``with TrainProgress(total) as p: p.update(step, loss, rate)``; silent when not enabled (e.g. on
    the non-main processes of a distributed run). Without a terminal (a cluster job's log file) a live
    bar never shows, so each update prints one plain line instead."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            disable=not enabled,
        )
        self.plain = enabled and not self.progress.console.is_terminal
        self.total = total
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", rate="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, rate: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.2f}")
        if self.plain:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            self.progress.console.print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} it/s  eta {eta:.0f}s")
