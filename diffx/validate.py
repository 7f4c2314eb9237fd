"""Start-up checks of a composed config: fail in a second, with one line naming the key and the fix,
instead of after the data has loaded or deep inside a forward pass.

``validate(cfg, command)`` runs in the CLI before the task and can be called from code. It does not
repeat the parts' own checks: it instantiates the cheap parts now (schedule and objective for real,
the model on the meta device, which allocates nothing), so their constructors' DiffxErrors (heads
vs width, image size vs downsampling or patch size, unknown prediction) surface before any heavy work.

Importing this module is cheap (no torch), so the CLI reports a bad override at once.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffx.config import options_with_key
from diffx.errors import DiffxError

# (key, integer?, lowest allowed, highest allowed, is the lowest itself allowed?)
_TRAIN_NUMBERS = [
    ("seed", True, 0, None, True),
    ("train.steps", True, 1, None, True),
    ("train.batch_size", True, 1, None, True),
    ("train.save_every", True, 1, None, True),
    ("train.log_every", True, 1, None, True),
    ("train.warmup", True, 0, None, True),
    ("train.num_workers", True, 0, None, True),
    ("train.lr", False, 0, None, False),
    ("train.weight_decay", False, 0, None, True),
    ("train.grad_clip", False, 0, None, True),
    ("train.ema_decay", False, 0, 1, True),
    ("train.cond_drop", False, 0, 1, True),
]
_SAMPLE_NUMBERS = [
    ("seed", True, 0, None, True),
    ("steps", True, 1, None, True),
    ("n", True, 1, None, True),
    ("batch_size", True, 1, None, True),
    ("cfg", False, 0, None, True),
]
_CALIBRATE_NUMBERS = _SAMPLE_NUMBERS[:2] + _SAMPLE_NUMBERS[3:] + [
    ("samples", True, 1, None, True),
    ("validation", True, 1, None, True),
    ("holdout", True, 1, None, True),
    ("iters", True, 0, None, True),
    ("reference_steps", True, 2, None, True),
    ("lr", False, 0, None, True),
    ("t_lr", False, 0, None, True),
]
_PATH_KEYS = ("path", "ckpt", "checkpoint")  # keys (or *_path, *_ckpt ...) that must name an existing file


def validate(cfg: DictConfig, command: str) -> None:
    """Check ``cfg`` for ``diffx <command>``; raises DiffxError with one line naming the key."""
    checks = {"train": _check_train, "sample": _check_sample, "calibrate": _check_calibrate}
    try:
        checks.get(command, _check_other)(cfg)
    except DiffxError:
        raise
    except OmegaConfBaseException as e:  # a bad interpolation, a missing value read by a check
        raise DiffxError(f"{e.full_key or 'config'}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a part's constructor wrapped by Hydra
        cause = as_diffx_error(e)
        if cause is None:
            raise
        raise cause from None


def as_diffx_error(e: BaseException) -> DiffxError | None:
    """The DiffxError behind ``e`` (Hydra wraps a constructor's error in InstantiationException)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DiffxError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _check_train(cfg: DictConfig) -> None:
    _check_missing(cfg)
    _check_numbers(cfg, _TRAIN_NUMBERS)
    if cfg.train.mixed_precision not in ("no", "fp16", "bf16"):
        raise DiffxError(f"train.mixed_precision={cfg.train.mixed_precision}: expected no, fp16 or bf16")
    _check_paths(cfg)
    if cfg.get("resume"):
        from diffx.resume import check_resumable

        check_resumable(cfg.resume)
    for key in ("model", "objective", "schedule", "latent", "text_encoder"):
        if isinstance(cfg.get(key), DictConfig):
            check_params(cfg[key], key)
    _dry_build(cfg)


def _check_sample(cfg: DictConfig, numbers=_SAMPLE_NUMBERS) -> None:
    import torch

    from diffx import checkpoint

    _check_missing(cfg)
    _check_numbers(cfg, numbers)
    if not isinstance(cfg.overwrite, bool):
        raise DiffxError(f"overwrite={cfg.overwrite}: expected true or false")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise DiffxError(f"device={cfg.device}: CUDA is not available here; use device=cpu or device=auto")
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx sample ckpt=runs/<run>/model.safetensors")
    for key in ("sampler", "grid"):
        check_params(cfg[key], key)
    # Header and metadata only: a wrong or corrupt file fails before any weight is read. Whether the
    # model is conditional (for cfg) is the condition source's call, made in sample() once it is built.
    checkpoint.read_header(cfg.ckpt)


def _check_calibrate(cfg: DictConfig) -> None:
    """``diffx sample``'s checks, then: the base sampler can be traced (``learned.trace`` refuses a
    stochastic one; a two-step trace on a stand-in schedule costs nothing) and is not a fitted one."""
    from hydra.utils import instantiate

    from diffx import grids, learned, schedules

    if not isinstance(cfg.learn_times, bool):
        raise DiffxError(f"learn_times={cfg.learn_times}: expected true or false")
    _check_sample(cfg, _CALIBRATE_NUMBERS)
    if cfg.sampler._target_ == "diffx.learned.load":
        raise DiffxError("sampler=learned: calibrate starts from a classical sampler (ddim, euler, heun, dpmpp, "
                         "dpmpp_3m, unipc, ipndm), not from a fitted one")
    learned.trace(instantiate(cfg.sampler), schedules.FlowLinear(), grids.uniform(2))


def _check_other(cfg: DictConfig) -> None:
    """Any other command (``diffx eval``): required values, the sampler's keys, the checkpoint's header."""
    from diffx import checkpoint

    _check_missing(cfg)
    for key in ("sampler", "grid"):
        if isinstance(cfg.get(key), DictConfig):
            check_params(cfg[key], key)
    if isinstance(cfg.get("ckpt"), str):
        checkpoint.read_header(cfg.ckpt)


def _check_missing(cfg: DictConfig) -> None:
    """``???`` values (e.g. ``data.path`` of ``data=imagefolder``) without resolving anything."""
    stack = [("", OmegaConf.to_container(cfg, resolve=False))]
    while stack:
        key, node = stack.pop()
        if node == "???":
            raise DiffxError(f"{key} is required: set {key}=...")
        if isinstance(node, dict):
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in node.items())


def _check_numbers(cfg: DictConfig, table) -> None:
    for key, integer, lo, hi, lo_ok in table:
        v = OmegaConf.select(cfg, key)
        kind = "an integer" if integer else "a number"
        is_number = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
        in_range = is_number and (v >= lo if lo_ok else v > lo) and (hi is None or v <= hi)
        if not in_range:
            bound = f"{'>=' if lo_ok else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise DiffxError(f"{key}={v}: expected {kind} {bound}")


def _check_paths(cfg: DictConfig) -> None:
    """A set ``path``/``ckpt`` key of a part (``data.path``, a VAE's ``latent.path``) must exist.
    Required ones are ``???`` in their YAML, caught by ``_check_missing``; null means unused."""
    for part in ("data", "latent", "model", "objective"):
        node = cfg.get(part)
        for k, v in (node.items() if isinstance(node, DictConfig) else []):
            if isinstance(v, str) and any(k == p or k.endswith(f"_{p}") for p in _PATH_KEYS):
                if not Path(v).expanduser().exists():
                    raise DiffxError(f"{part}.{k}={v}: no such file or directory")


def check_params(node: DictConfig, key: str) -> None:
    """Every key of a ``_target_`` node must be a parameter of its target, of the annotated type
    when that is a plain one (recursively): ``objective.prediction`` on ``objective=flow`` or
    ``model.channels=abc`` fail here, naming the key, instead of as a TypeError deep in Hydra."""
    from hydra.utils import get_object

    target = node.get("_target_")
    if target is None:  # a plain mapping (e.g. text_encoder.encoders): its entries may have targets
        for k in node:
            if not OmegaConf.is_interpolation(node, k) and isinstance(node[k], DictConfig):
                check_params(node[k], f"{key}.{k}")
        return
    try:
        params = _signature(get_object(target)).parameters
    except Exception as e:  # noqa: BLE001 - an import error, a typo in _target_
        raise DiffxError(f"{key}._target_={target}: cannot import it ({_first_line(e)})") from None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for k in node:
        if isinstance(k, str) and k.startswith("_"):
            continue
        if not takes_any and k not in params:
            option = _choice(key)
            others = [o for o in options_with_key(key.replace(".", "/"), k) if o != option]
            hint = f"; {k} is a key of {', '.join(f'{key}={o}' for o in others)}" if others else ""
            takes = ", ".join(p for p in params if not p.startswith("_"))
            raise DiffxError(f"{key}.{k} is not a parameter of {key}={option or target} "
                             f"({target} takes {takes}){hint}")
        if OmegaConf.is_interpolation(node, k):  # its value is checked where it is defined
            continue
        value = node[k]
        if isinstance(value, DictConfig):
            check_params(value, f"{key}.{k}")
        elif k in params and not _type_ok(value, params[k].annotation):
            raise DiffxError(f"{key}.{k}={value}: expected {_type_name(params[k].annotation)} "
                             f"(a parameter of {target})")


def _signature(obj) -> inspect.Signature:
    try:
        return inspect.signature(obj, eval_str=True)  # the modules use `from __future__ import annotations`
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: check names only
        return inspect.signature(obj)


_PLAIN = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_ok(value, annotation) -> bool:
    """Only plain annotations (int, float, bool, str, and unions of them) are checked; null is left
    to the target, as many parameters take it whatever their annotation says."""
    if value is None:
        return True
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if not all(k in _PLAIN or k is type(None) for k in kinds):
        return True
    return any((k is int and isinstance(value, int) and not isinstance(value, bool))
               or (k is float and isinstance(value, (int, float)) and not isinstance(value, bool))
               or (k in (bool, str) and isinstance(value, k)) for k in kinds)


def _type_name(annotation) -> str:
    kinds = typing.get_args(annotation) or (annotation,)
    return " or ".join(_PLAIN[k] for k in kinds if k in _PLAIN)


def _dry_build(cfg: DictConfig) -> None:
    """Run the parts' own shape and option checks now: schedule and objective are cheap to build
    for real; the model is built on the meta device, which allocates no memory."""
    import torch
    from hydra.utils import get_object, instantiate

    schedule = instantiate(cfg.schedule)
    instantiate(cfg.objective, schedule=schedule)
    # The latent's downsampling as a class attribute; a latent that only knows it once loaded
    # (a VAE) leaves the model's size check to the real build.
    factor = getattr(get_object(cfg.latent._target_), "factor", None)
    size = cfg.data.get("size")
    if not isinstance(factor, int) or not isinstance(size, int):
        return
    if size < 1 or size % factor:
        raise DiffxError(f"data.size={size} is not a positive multiple of the latent's downsampling factor "
                         f"{factor}; choose a data.size divisible by {factor}")
    with torch.device("meta"):
        # in_channels=3 (RGB) and no classes: the channel and class counts change no shape check.
        instantiate(cfg.model, in_channels=3, image_size=size // factor, num_classes=0)


def _choice(key: str) -> str | None:
    """The option chosen for group ``key`` (``objective`` -> ``flow``) when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(key.replace(".", "/"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
