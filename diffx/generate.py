"""The generation layer: a checkpoint's parts and a request -> images.

Every command that draws from a model (``sample``, ``eval``, ``calibrate``, ``interpolate``, and later
distillation and uncertainty) goes through here, so the start noise (its shape through the latent
space, one seed per image), the denoiser with its guidance, the conditions and the decoding are written
once. Image i uses its own seed whatever the batch it falls in, so a batch size never changes an image.

A request may also bring its own start noises (``Request.noise``: interpolation), a second condition
per image mixed into the denoiser (``Request.others``, ``Request.weights``), or an image to start from
(``Request.start``: img2img and inpainting, ``diffx.samplers.inpaint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor

from diffx import noise
from diffx.build import Parts
from diffx.errors import DiffxError, first_line
from diffx.images import to_uint8
from diffx.samplers import inpaint
from diffx.samplers import plan as plans
from diffx.samplers.denoiser import Denoiser, make_denoiser
from diffx.samplers.single import ddim
from diffx.tensors import bcast


@dataclass
class Start:
    """Start from an image instead of pure noise (``diffx.samplers.inpaint``): ``x0`` (1, C, H, W) is the
    image in the model's space; the sampler starts at ``t = strength`` (SDEdit: 1 is plain sampling,
    0 gives the image back); ``mask`` (1, 1, H, W) bool in the same space is True where the model
    generates and False where the image is kept (RePaint), tried ``resample`` times per step."""

    x0: Tensor
    strength: float = 1.0
    mask: Tensor | None = None
    resample: int = 1


@dataclass
class Request:
    """What to draw: per image its seed and the condition source's input (a label, a prompt, None);
    the negative inputs guidance steers away from (None: the null condition); the guidance scale.

    Optionally: ``noise`` (N, C, H, W), start noises to use instead of the seeds' (the seeds then feed
    only a stochastic sampler's fresh noise); ``others`` and ``weights``, a second input per image and
    its weight w: the denoiser is then ``(1 - w) D(x | input) + w D(x | other)`` (``Mixture``);
    ``start``, an image to start from (img2img, inpainting); ``rescale`` and ``interval``, the
    guidance's options (``diffx.samplers.denoiser``: CFG rescale, a guidance interval in t)."""

    seeds: list[int]
    inputs: list
    negatives: list | None = None
    cfg: float = 1.0
    noise: Tensor | None = None
    others: list | None = None
    weights: list[float] | None = None
    start: Start | None = None
    rescale: float = 0.0
    interval: tuple[float, float] | None = None


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    return torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def sampling_plan(cfg, schedule, native: dict | None = None) -> plans.Plan:
    """The sampling plan a command's config asks for: ``sampler=``, ``grid=`` and ``steps=``.

    A distilled student (``diffx distill``) records its native step count and call times in its
    checkpoint (``native``: the checkpoint's ``sampling``, as its header was read): with ``steps`` null and
    the sampler and grid left to diffx (``auto``, the defaults), it runs on them with DDIM (Euler on a flow
    path), the one-step update its targets were built for. Read from the config itself, so a Python caller
    composing ``sampler=euler`` gets Euler as a command line does."""
    if native is not None and cfg.get("steps") is None and not _chosen(cfg, "sampler", "grid"):
        return plans.Plan(ddim, torch.tensor(native["ts"], dtype=torch.float64), "ddim", native["steps"], True,
                          f"native ({native.get('method', 'distilled')})")
    return plans.make(instantiate(cfg.sampler), instantiate(cfg.grid), cfg.get("steps"), schedule)


def _chosen(cfg, *groups: str) -> bool:
    """Whether any of the config ``groups`` names something other than diffx's ``auto`` choice."""
    return any(cfg.get(g) is not None and not str(cfg[g].get("_target_", "")).startswith("diffx.samplers.auto.")
               for g in groups)


def guidance_options(cfg) -> dict:
    """``guidance.rescale`` and ``guidance.interval`` of a command's config, as ``Request`` fields."""
    g = cfg.get("guidance") or {}
    interval = g.get("interval")
    return {"rescale": g.get("rescale", 0.0), "interval": None if interval is None else tuple(interval)}


def check_guidance(scale: float, parts: Parts, ckpt) -> None:
    """Guidance (``cfg != 1``) needs a condition to steer by."""
    if scale != 1.0 and not parts.condition.guidable:
        raise DiffxError(f"cfg={scale} needs a conditional model, but {ckpt} is unconditional; use cfg=1")


def start_noise(parts: Parts, generators: list[torch.Generator], device) -> Tensor:
    """(N, C, H, W) standard normal noise in the model's space, row i from ``generators[i]``
    (``noise.generators(seeds)``: one per image)."""
    return noise.randn((len(generators), *parts.x0_shape), generators, device)


def denoiser(parts: Parts, inputs: list, negatives: list | None, scale: float, device, rescale: float = 0.0,
             interval=None) -> Denoiser:
    """The denoiser for one batch: its conditions encoded, guided at ``scale``, x0 clipped to the
    latent space's range."""
    condition = parts.condition
    cond = condition.encode(inputs, device)
    if takes_guidance(parts.model):
        # a guided-distilled student (Meng et al. 2023): the scale is an input, one pass per step, no uncond
        if negatives is not None:
            raise DiffxError("a guided-distilled student has no unconditional pass to steer away from negatives; "
                             "leave negative_prompt empty")
        cond = {**cond, "w": torch.full((len(inputs),), float(scale), device=device)}
        return make_denoiser(parts.model, parts.objective, cond, None, cfg_scale=1.0, x0_range=parts.latent.x0_range)
    uncond = condition.null(len(inputs), device) if negatives is None else condition.encode(negatives, device)
    return make_denoiser(parts.model, parts.objective, cond, uncond, cfg_scale=scale, x0_range=parts.latent.x0_range,
                         rescale=rescale, interval=interval)


def takes_guidance(model) -> bool:
    """Whether ``model`` (or the net inside a text wrapper) takes the guidance scale as ``cond["w"]``."""
    return bool(getattr(getattr(model, "net", model), "guidance_embed", False))


class Mixture:
    """``(1 - w) D(x | c_a) + w D(x | c_b)`` per image, from one batched call of a denoiser ``both`` whose
    first half of the batch holds the conditions ``c_a`` and its second half ``c_b``; ``weights`` (B,).

    The objectives' ``to_x0_noise`` is affine, so this is the same mixture of the network outputs, of
    x0_hat and of noise_hat; in score terms (``noise_hat = -sigma * score``) it is the score of the
    geometric mixture ``p(x | c_a)^(1 - w) p(x | c_b)^w`` at each noise level (the composition of
    Liu et al. 2022, "Compositional visual generation"). It needs no model internals, so it mixes class
    labels (integers) and prompts of every text encoder alike. The weights 0 and 1 give ``D(x | c_a)``
    and ``D(x | c_b)`` exactly."""

    def __init__(self, both: Denoiser, weights: Tensor):
        self.both, self.weights = both, weights

    @property
    def nfe(self) -> int:
        return self.both.nfe

    def __call__(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        x0, noise_hat = self.both(torch.cat([x, x]), t)  # (2B, C, H, W): c_a rows, then c_b rows
        w = bcast(self.weights.to(device=x.device, dtype=x0.dtype), x)
        (x0_a, x0_b), (n_a, n_b) = x0.chunk(2), noise_hat.chunk(2)
        return (1 - w) * x0_a + w * x0_b, (1 - w) * n_a + w * n_b


def mixture(parts: Parts, inputs: list, others: list, weights: list[float], negatives: list | None, scale: float,
            device, rescale: float = 0.0, interval=None) -> Mixture:
    """The denoiser mixing each image's condition ``inputs[i]`` with ``others[i]`` at weight ``weights[i]``,
    each guided at ``scale`` (``Mixture``)."""
    both = denoiser(parts, list(inputs) + list(others), None if negatives is None else list(negatives) * 2,
                    scale, device, rescale, interval)
    return Mixture(both, torch.tensor(weights, dtype=torch.float64))


def check_start(plan: plans.Plan) -> None:
    """img2img and inpainting run the sampler on a grid of their own: a fitted solver, whose coefficients
    belong to its own call times from pure noise (the ``ts`` it declares, diffx.samplers.plan), cannot."""
    if plan.own_times:
        raise DiffxError(f"sampler={plan.name} is fitted to its own call times from pure noise; init_image= "
                         "needs a sampler on a grid, e.g. sampler=dpmpp")


def image_start(parts: Parts, init_image, strength: float | None = None, mask=None, resample: int = 1,
                device=None) -> Start:
    """An image file (and a mask file) -> ``Start``. The image is fitted to the checkpoint's data size as
    training data is (``diffx.data.fit``: centre crop, Lanczos) and encoded into the model's space. The
    mask (white: generate, black: keep) is fitted the same way, so it lines up with the image, then
    averaged over each ``x0`` pixel's area (a latent pixel covers ``factor``^2 image pixels) and
    thresholded at one half. ``strength`` None: 0.6 for img2img, 1 (the masked part drawn afresh)
    with a mask."""
    size = parts.spec.image_size
    x = read_image(init_image, "init_image", size, "RGB" if parts.spec.channels == 3 else "L") * 2 - 1
    with torch.no_grad():
        x0 = parts.latent.encode(x.to(device))
    redraw = None
    if mask is not None:
        white = read_image(mask, "mask", size, "L").to(device)  # (1, 1, S, S) in [0, 1]
        redraw = F.interpolate(white, size=tuple(x0.shape[-2:]), mode="area") >= 0.5
    strength = (1.0 if mask is not None else 0.6) if strength is None else float(strength)
    return Start(x0, strength, redraw, int(resample))


def read_image(path, key: str, size: int, mode: str) -> Tensor:
    """(1, C, size, size) in [0, 1] from an image file, fitted as training data is; ``key`` names the
    option in errors."""
    from PIL import Image

    from diffx.data import fit  # here, not above: diffx.data imports `datasets`, which sampling rarely needs

    try:
        with Image.open(path) as im:
            pixels = np.array(fit(im, size, mode), dtype=np.uint8)  # a writable copy, for torch
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DiffxError(f"{key}={path}: cannot read the image ({first_line(e)}); expected an image file") from None
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255  # (H, W, C) -> (1, C, H, W)


def draw(plan: plans.Plan, schedule, denoise, z: Tensor, generator=None, start: Start | None = None) -> Tensor:
    """``x0`` for one batch: the plan run from the noise ``z``, or from ``start``'s image noised to its
    strength with ``z``, on the plan's grid rescaled to start there, keeping the unmasked part
    (``diffx.samplers.inpaint``). The kept part is pasted once more at the end, RePaint's last
    replacement, which is exact already for every diffx sampler (``inpaint.Known``)."""
    if start is None:
        return plan(denoise, schedule, z, generator=generator)
    ts = inpaint.from_time(plan.ts, start.strength)
    x = inpaint.start(schedule, start.x0, z, float(ts[0]))
    if start.mask is None:
        return plan.sampler(denoise, schedule, x, ts, generator=generator)
    known = inpaint.Known(denoise, schedule, start.x0, start.mask)
    x = inpaint.repaint(plan.sampler, known, schedule, x, ts, generator, start.resample)
    return torch.where(start.mask, x, start.x0.to(x.dtype))


def generate(parts: Parts, plan: plans.Plan, request: Request, batch_size: int, device) -> tuple[np.ndarray, int]:
    """Images (N, H, W, C) uint8 for ``request``, in batches of ``batch_size``, and the NFE per batch."""
    if request.start is not None:
        check_start(plan)
    images, nfe = [], 0
    for lo in range(0, len(request.seeds), batch_size):
        rows = slice(lo, lo + batch_size)
        gens = noise.generators(request.seeds[rows])
        z = start_noise(parts, gens, device) if request.noise is None else request.noise[rows].to(device)
        negatives = None if request.negatives is None else request.negatives[rows]
        options = {"rescale": request.rescale, "interval": request.interval}
        denoise = (denoiser(parts, request.inputs[rows], negatives, request.cfg, device, **options)
                   if request.others is None
                   else mixture(parts, request.inputs[rows], request.others[rows], request.weights[rows], negatives,
                                request.cfg, device, **options))
        x0 = draw(plan, parts.objective.schedule, denoise, z, gens, request.start)
        images.append(to_uint8(parts.latent.decode(x0)))
        nfe = denoise.nfe
    return np.concatenate(images), nfe
