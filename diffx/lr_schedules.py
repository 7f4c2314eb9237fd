"""Learning-rate schedules: the multiplier of ``train.lr`` at each optimizer step, for ``LambdaLR``.

Every schedule is the same linear warm-up (Goyal et al. 2017) times a decay that starts where the
warm-up ends and reaches ``final`` at step ``total`` (``train.steps``), holding it after:

    multiplier(s) = min(1, (s + 1) / warmup) * decay(p),    p = clip((s - warmup) / (total - warmup), 0, 1)

``s`` is ``LambdaLR``'s count of optimizer steps taken so far: ``s = 0`` sets the rate of the first
step. During the warm-up ``p = 0`` and ``decay = 1``; after it the warm-up factor is 1; so the two
pieces meet at 1 and the curve is continuous there.

A schedule is config, not state: a function of the step and of ``train.warmup``, ``train.steps`` and
``lr_schedule.*``, which a resumed run reads from its own config like every other key (the step itself
is ``LambdaLR``'s, in the resume state). So the numbers live in slots and ``__dict__`` stays empty:
``LambdaLR.state_dict()`` saves a callable object's ``__dict__`` (here ``{}``, which the resume state
writes as JSON) and ``load_state_dict()`` writes it back, which would otherwise pin a run resumed with
a larger ``train.steps`` to the first run's ``total``, unlike a run trained straight to that many steps.
"""

from __future__ import annotations

import math

from diffx.errors import DiffxError


class Constant:
    """Linear warm-up over ``warmup`` steps, then the full rate (``lr_schedule=constant``)."""

    __slots__ = ("warmup", "total", "__dict__")  # numbers in slots; the (empty) __dict__ is what LambdaLR saves

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup))
        p = min(1.0, max(0, step - self.warmup) / max(1, self.total - self.warmup))
        return warm * self.decay(p)

    def decay(self, p: float) -> float:
        """The multiplier at fraction ``p`` in [0, 1] of the post-warm-up steps: 1 at p = 0."""
        return 1.0


class _Decaying(Constant):
    """A schedule that falls from 1 after the warm-up to ``final`` at step ``total``."""

    __slots__ = ("final",)

    def __init__(self, warmup: int, total: int, final: float = 0.0):
        super().__init__(warmup, total)
        if isinstance(final, bool) or not isinstance(final, (int, float)) or not 0 <= final <= 1:
            raise DiffxError(f"lr_schedule.final={final}: expected a number in [0, 1] (a fraction of train.lr)")
        if warmup >= total:
            raise DiffxError(f"train.warmup={warmup}: expected fewer than train.steps={total} steps, or "
                             f"lr_schedule={type(self).__name__.lower()} never decays; lower train.warmup")
        self.final = float(final)

    def decay(self, p: float) -> float:
        return self.final + (1 - self.final) * self.shape(p)

    def shape(self, p: float) -> float:
        """The fraction of the way from ``final`` up to 1 at ``p``: 1 at p = 0, 0 at p = 1."""
        raise NotImplementedError


class Cosine(_Decaying):
    """Warm-up, then half a cosine from 1 to ``final`` (SGDR without restarts, Loshchilov & Hutter 2017,
    eq. 5: ``eta_min + (eta_max - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``)."""

    def shape(self, p: float) -> float:
        return (1 + math.cos(math.pi * p)) / 2


class Linear(_Decaying):
    """Warm-up, then a straight line from 1 to ``final`` (the schedule BERT trained with, Devlin et al. 2019)."""

    def shape(self, p: float) -> float:
        return 1 - p
