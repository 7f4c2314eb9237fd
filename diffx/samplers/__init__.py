"""Samplers, one module per family, mirroring ``conf/sampler/``:

- ``denoiser``: ``denoise(x, t) -> (x0_hat, noise_hat)``, the network behind its parameterisation,
  with classifier-free guidance and x0 clipping: the one place CFG lives;
- ``single``: single-step samplers (DDIM, DDPM, Euler, Heun);
- ``multistep``: the exponential-integrator family (DPM-Solver++ 2M / SDE / 3M, UniPC) and iPNDM;
- ``learned``: a linear solver fitted to one checkpoint (``diffx calibrate``), a sampler like the others;
- ``calibration``: the fit as a library call on any model: the best base, the fit, the guard that keeps the better;
- ``auto``: ``sampler=auto``, the measured best untuned sampler and grid per schedule and NFE;
- ``guard``: every declared sampler stops with one line when its state goes non-finite or explodes;
- ``plan``: a sampler bound to its call times, what each sampler declares about itself, steps for an NFE budget.

Every sampler is ``sampler(denoise, schedule, x, ts, generator=None, **options) -> x0``.
"""

# The Python API in one namespace (``from diffx import samplers; samplers.dpmpp(...)``); the configs
# name the defining modules (``diffx.samplers.multistep.dpmpp``).
from diffx.samplers.denoiser import Denoise, Denoiser, make_denoiser  # noqa: E402,F401
from diffx.samplers.multistep import dpmpp, dpmpp_3m, dpmpp_sde, ipndm, unipc  # noqa: E402,F401
from diffx.samplers.single import ddim, ddpm, euler, heun  # noqa: E402,F401
