"""Objectives: what the network predicts, the training loss, and the one place the prediction is undone.

``to_x0_noise`` is affine in the network output, so classifier-free guidance applied to the output
equals guidance on ``(x0_hat, noise_hat)`` (ARCHITECTURE.md section 2): samplers never see the
parameterisation.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor

from diffx.errors import DiffxError
from diffx.schedules import Schedule
from diffx.tensors import bcast
from diffx.time_sampling import flow_shift


_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": lambda a, b: (a - b) ** 2,
    "l1": lambda a, b: (a - b).abs(),
}


class Objective:
    """Base: draws t, noises x0, calls the model, returns the per-sample weighted loss (B,)."""

    family: ClassVar[str]

    def __init__(self, schedule: Schedule, t_sampler: Callable, family: str | None = None, loss: str = "mse"):
        if family is not None and family != self.family:
            raise DiffxError(f"objective.family={family!r} does not match objective {self.family!r}")
        if loss not in _LOSSES:
            raise DiffxError(f"objective.loss={loss!r}: expected one of {sorted(_LOSSES)}")
        self.schedule = schedule
        self.t_sampler = t_sampler
        self.distance = _LOSSES[loss]

    t_range: tuple[float, float] = (0.0, 1.0)

    def sample_t(self, n: int, device=None, generator=None) -> Tensor:
        return self.t_sampler(n, device=device, generator=generator)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def to_x0_noise(self, pred: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def weight(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def loss(self, model, x0: Tensor, cond=None, generator=None, t: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Per-sample loss (B,): ``w(t) * mean |model(x_t, t) - target|^p`` over pixels. ``t`` (B,) and
        ``noise`` (like x0) are drawn here unless given (``diffx.train`` draws them for all processes)."""
        t = self.sample_t(x0.shape[0], device=x0.device, generator=generator) if t is None else t
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator) if noise is None else noise
        alpha, sigma = self.schedule.alpha_sigma(t)
        xt = bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise
        pred = model(xt, t, cond)
        per_pixel = self.distance(pred.float(), self.target(x0, noise, t).float())
        return per_pixel.flatten(1).mean(1) * self.weight(t)


# DDPM predictions: target and inverse. For a general (alpha, sigma) path the v of Salimans & Ho
# (2022), ``v = alpha * noise - sigma * x0``, inverts with det = alpha^2 + sigma^2 (1 when VP).
def _eps_target(x0, noise, a, s):
    return noise


def _eps_invert(pred, xt, a, s):
    return (xt - s * pred) / a, pred


def _v_target(x0, noise, a, s):
    return a * noise - s * x0


def _v_invert(pred, xt, a, s):
    det = a * a + s * s
    return (a * xt - s * pred) / det, (s * xt + a * pred) / det


def _x0_target(x0, noise, a, s):
    return x0


def _x0_invert(pred, xt, a, s):
    return pred, (xt - a * pred) / s


_PREDICTIONS = {
    "eps": (_eps_target, _eps_invert),
    "v": (_v_target, _v_invert),
    "x0": (_x0_target, _x0_invert),
}

# Min-SNR-gamma weights (Hang et al. 2023, eq. 9-10) expressed per prediction so that each equals
# min(SNR, gamma) times the x0-space MSE.
_MIN_SNR = {
    "eps": lambda snr, g: torch.clamp(snr, max=g) / snr,
    "v": lambda snr, g: torch.clamp(snr, max=g) / (snr + 1),
    "x0": lambda snr, g: torch.clamp(snr, max=g),
}
_WEIGHTINGS = {
    "uniform": lambda prediction, snr, g: torch.ones_like(snr),  # DDPM's "simple" loss
    "min_snr": lambda prediction, snr, g: _MIN_SNR[prediction](snr, g),
}


class DDPM(Objective):
    """Denoising diffusion (Ho et al. 2020) with eps, v (Salimans & Ho 2022) or x0 prediction.

    Training t is drawn from ``t_sampler`` and snapped to the schedule's discrete steps
    ``t = (i + 1) / N`` when the schedule is discrete, so each step is trained as DDPM trains it.
    """

    family = "ddpm"

    def __init__(self, schedule, t_sampler, family=None, loss="mse", prediction="eps", weighting="uniform",
                 min_snr_gamma: float = 5.0):
        super().__init__(schedule, t_sampler, family, loss)
        if prediction not in _PREDICTIONS:
            raise DiffxError(f"objective.prediction={prediction!r}: expected one of {sorted(_PREDICTIONS)}")
        if weighting not in _WEIGHTINGS:
            raise DiffxError(f"objective.weighting={weighting!r}: expected one of {sorted(_WEIGHTINGS)}")
        self.prediction, self.weighting, self.gamma = prediction, weighting, min_snr_gamma
        self._target, self._invert = _PREDICTIONS[prediction]
        n = getattr(schedule, "num_steps", None)
        self.num_steps = n
        self.t_range = (schedule.t_min, 1.0)

    def sample_t(self, n, device=None, generator=None):
        u = super().sample_t(n, device, generator)
        if self.num_steps is None:
            return u
        return torch.ceil(u * self.num_steps).clamp(1, self.num_steps) / self.num_steps

    def target(self, x0, noise, t):
        a, s = (bcast(v, x0) for v in self.schedule.alpha_sigma(t))
        return self._target(x0, noise, a, s)

    def to_x0_noise(self, pred, xt, t):
        a, s = (bcast(v, xt).to(pred.dtype) for v in self.schedule.alpha_sigma(t))
        return self._invert(pred, xt, a, s)

    def weight(self, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        return _WEIGHTINGS[self.weighting](self.prediction, (alpha / sigma) ** 2, self.gamma)


class Flow(Objective):
    """Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2022): predict the velocity.

    The target is ``v = d_alpha * x0 + d_sigma * noise`` (``noise - x0`` on the linear path). ``shift`` > 1
    warps the training t toward noise (SD3, Esser et al. 2024, eq. 23), as for higher resolutions.
    """

    family = "flow"

    def __init__(self, schedule, t_sampler, family=None, loss="mse", shift: float = 1.0):
        super().__init__(schedule, t_sampler, family, loss)
        self.shift = float(shift)

    def sample_t(self, n, device=None, generator=None):
        return flow_shift(super().sample_t(n, device, generator), self.shift)

    def target(self, x0, noise, t):
        da, ds = (bcast(v, x0) for v in self.schedule.d_alpha_sigma(t))
        return da * x0 + ds * noise

    def to_x0_noise(self, pred, xt, t):
        """Solve ``[alpha sigma; d_alpha d_sigma] [x0; noise] = [xt; v]`` (a 2x2 system per sample)."""
        a, s = (bcast(v, xt).to(pred.dtype) for v in self.schedule.alpha_sigma(t))
        da, ds = (bcast(v, xt).to(pred.dtype) for v in self.schedule.d_alpha_sigma(t))
        det = ds * a - s * da
        return (ds * xt - s * pred) / det, (a * pred - da * xt) / det

