"""Stopping a training run cleanly on a signal: SIGTERM (a scheduler's kill, ``docker stop``), SIGINT
(Ctrl-C) and SIGUSR1 (SLURM's warning before the time limit, ``sbatch --signal=USR1@120``).

While the training loop runs, these signals only set a flag. The loop reads it once per step, after
the step's optimizer update, saves a resume state at that step, prints one line on how to resume, and
raises ``Preempted``, which exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT, 138 for
SIGUSR1), the code a shell reports for a process killed by that signal. A second signal while the
state is written does not interrupt the write; SIGKILL still can, and the previous state then stays
loadable (the states are written atomically: ``diffx.atomic``). Outside the loop the signals keep
their usual handlers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class Preempted(SystemExit):
    """A run stopped by a signal after saving its state; the exit code is ``128 + signal``. ``message``
    says how to resume (None on the processes that do not print)."""

    def __init__(self, code: int, message: str | None):
        super().__init__(code)
        self.message = message


class Preemption:
    """``with Preemption() as preemption: ... if preemption.requested(accelerator, sync): ...``.

    Installs the handlers on entry and puts the previous ones back on exit. Signal handlers can only
    be set from the main thread; elsewhere (a run started from a worker thread) nothing is installed.
    """

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        # Printed here, after the contexts inside this one (the progress bar) have closed: the last line.
        if isinstance(exc, Preempted) and exc.message:
            print(exc.message, file=sys.stderr, flush=True)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # os.write, not print: a handler that prints while the loop is printing to the same stream
        # raises a "reentrant call" error in the middle of it.
        os.write(sys.stderr.fileno(), f"diffx: {signal.Signals(signum).name} received while stopping; still saving "
                                      "the resume state (SIGKILL aborts, and the previous state stays loadable)\n"
                 .encode())

    def requested(self, accelerator, sync: bool) -> bool:
        """Whether the run stops after this step. One process reads its flag, a Python attribute: no
        device work. Several processes may see a signal at different steps, and all must stop at the
        same one, so they agree by an all-reduce, only at the ``sync`` steps (the log steps, where the
        loop reads the device anyway)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if not sync:
            return False
        flag = torch.tensor([float(self.signum is not None)], device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    def save_point(self, step: int, tc, accelerator) -> tuple[bool, bool]:
        """``(save, stop)`` after optimizer step ``step`` of a run configured by ``tc`` (``train.*``): save
        every ``save_every`` steps, at the last step, and before stopping for a signal."""
        stop = step < tc.steps and self.requested(accelerator, sync=step % tc.log_every == 0)
        return stop or step % tc.save_every == 0 or step == tc.steps, stop

    def stopped(self, command: str, run_dir, step: int, main: bool = True) -> Preempted:
        """The exception that ends the run once its state is saved at ``step``; leaving the ``with``
        block, the main process prints one line on how to resume."""
        signum = self.signum or signal.SIGTERM  # a rank that stopped because another was signalled
        message = (f"diffx {command}: stopped by {signal.Signals(signum).name} after step {step}, resume state "
                   f"saved; continue with: diffx {command} resume={run_dir}")
        return Preempted(128 + signum, message if main else None)
