"""Start-up checks of a composed config: fail in a second, with one line naming the key and the fix,
instead of after the data has loaded or deep inside a forward pass.

``validate(cfg, command)`` runs in the CLI before the task and can be called from code. It does not
repeat the parts' own checks: it instantiates the cheap parts now (schedule and objective for real,
the model on the meta device, which allocates nothing), so their constructors' DiffxErrors (heads
vs width, image size vs downsampling or patch size, unknown prediction) surface before any heavy work.

Importing this module is cheap (no torch), so the CLI reports a bad override at once.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffx import trackers
from diffx.errors import DiffxError, as_diffx_error, first_line
from diffx.trust import check_params

# (key, integer?, lowest allowed, highest allowed, is the lowest itself allowed?)
_TRAIN_NUMBERS = [
    ("seed", True, 0, None, True),
    ("train.steps", True, 1, None, True),
    ("train.batch_size", True, 1, None, True),
    ("train.grad_accum", True, 1, None, True),
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
_TRAIN_VAE_NUMBERS = [row for row in _TRAIN_NUMBERS
                      if row[0] not in ("train.weight_decay", "train.cond_drop", "train.grad_accum")] + [
    ("train.kl_weight", False, 0, None, True),
    ("train.disc_start", True, 0, None, True),
    ("train.disc_weight", False, 0, None, True),
    ("train.holdout", True, 1, None, True),
]
_IMAGE_NUMBERS = [("strength", False, 0, 1, True), ("resample", True, 1, None, True)]  # diffx sample init_image=
_INTERPOLATE_NUMBERS = [("frames", True, 2, None, True)] + [
    row for row in _SAMPLE_NUMBERS if row[0] in ("steps", "batch_size", "cfg")]
_NULLABLE = {"steps", "strength"}  # null: the sampler's default (diffx.samplers.plan); img2img's default strength
_PATH_KEYS = ("path", "ckpt", "checkpoint")  # keys (or *_path, *_ckpt ...) that must name an existing file


def validate(cfg: DictConfig, command: str) -> None:
    """Check ``cfg`` for ``diffx <command>``; raises DiffxError with one line naming the key."""
    checks = {"train": _check_train, "sample": _check_sample, "calibrate": _check_calibrate,
              "interpolate": _check_interpolate, "train-vae": _check_train_vae}
    try:
        checks.get(command, _check_other)(cfg)
    except DiffxError:
        raise
    except OmegaConfBaseException as e:  # a bad interpolation, a missing value read by a check
        raise DiffxError(f"{e.full_key or 'config'}: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a part's constructor wrapped by Hydra
        cause = as_diffx_error(e)
        if cause is None:
            raise
        raise cause from None


def _check_precision(tc: DictConfig) -> None:
    """fp16 needs a CUDA GPU: on the CPU Accelerate would run float32 while the run says fp16."""
    import torch

    if tc.mixed_precision not in ("no", "fp16", "bf16"):
        raise DiffxError(f"train.mixed_precision={tc.mixed_precision}: expected no, fp16 or bf16")
    if tc.mixed_precision == "fp16" and (tc.get("cpu") or not torch.cuda.is_available()):
        raise DiffxError("train.mixed_precision=fp16 needs a CUDA GPU, and this run is on the CPU; "
                         "use train.mixed_precision=bf16 or no")


def _check_train(cfg: DictConfig) -> None:
    _check_missing(cfg)
    _check_numbers(cfg, _TRAIN_NUMBERS)
    _check_precision(cfg.train)
    _check_numbers(cfg, [("train.sample_every", True, 0, None, True)])  # 0: no sample grids
    _check_eval_every(cfg.train)
    _check_numbers(cfg, [("train.keep_last", True, 1, None, True)])  # resume states kept (resume=auto: diffx.config)
    trackers.check(cfg.train.log_with)  # the name, and that its package is installed
    for key in ("compile", "keep_freed_memory"):
        if not isinstance(cfg.train[key], bool):
            raise DiffxError(f"train.{key}={cfg.train[key]}: expected true or false")
    if cfg.train.compile:
        import torch._dynamo  # about a second: only when compiling

        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.train.compile_backend not in backends:
            raise DiffxError(f"train.compile_backend={cfg.train.compile_backend}: not a torch.compile backend; "
                             "expected inductor, aot_eager or eager (or any of torch._dynamo.list_backends())")
    _check_paths(cfg)
    if cfg.get("resume"):
        from diffx.resume import check_resumable

        check_resumable(cfg.resume)
    for key in ("model", "objective", "schedule", "latent", "text_encoder", "lr_schedule"):
        if isinstance(cfg.get(key), DictConfig):
            check_params(cfg[key], key)
    _dry_build(cfg)


def _check_eval_every(tc: DictConfig) -> None:
    """train.eval_every (0: off) and, when on, its metric names and counts (diffx.metrics.suite)."""
    every = tc.get("eval_every", 0)
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise DiffxError(f"train.eval_every={every}: expected an integer >= 0 (0: no evaluation during training)")
    if every:
        from diffx.metrics.suite import METRICS

        names = list(tc.eval_metrics) if isinstance(tc.eval_metrics, ListConfig) else [tc.eval_metrics]
        if not names or any(m not in METRICS for m in names):
            raise DiffxError(f"train.eval_metrics={names}: expected a list of {', '.join(METRICS)}")
        for key in ("eval_samples", "eval_reference"):
            if not isinstance(tc[key], int) or tc[key] < 2:
                raise DiffxError(f"train.{key}={tc[key]}: expected an integer >= 2")
        if {"fid", "kid"} & set(names):
            from diffx.metrics import inception

            inception.path()  # installed, before the first evaluation rather than at it


def _check_train_vae(cfg: DictConfig) -> None:
    """``diffx train-vae``: the numbers, the parts' keys, then the autoencoder (and the discriminator)
    built on the meta device, so a size the levels cannot halve fails now."""
    import torch
    from hydra.utils import instantiate

    from diffx.resume import check_resumable

    _check_missing(cfg)
    _check_numbers(cfg, _TRAIN_VAE_NUMBERS)
    for key in ("autoencoder", "discriminator"):
        check_params(cfg[key], key)
    _check_precision(cfg.train)
    _check_paths(cfg)
    if cfg.get("resume"):
        check_resumable(cfg.resume)
    size = cfg.data.get("size")
    if isinstance(size, int):
        with torch.device("meta"):  # RGB: the channel count changes no shape check
            instantiate(cfg.autoencoder, in_channels=3, image_size=size)
            if cfg.train.disc_weight > 0:
                instantiate(cfg.discriminator, in_channels=3, image_size=size)


def _check_sample(cfg: DictConfig, numbers=_SAMPLE_NUMBERS):
    """Returns the sampling plan on a stand-in schedule: the sampler (a fitted solver's file too), its
    grid and ``steps`` are checked before the checkpoint loads."""
    import torch

    from diffx import checkpoint, schedules
    from diffx.generate import sampling_plan

    _check_missing(cfg)
    _check_numbers(cfg, numbers)
    if not isinstance(cfg.overwrite, bool):
        raise DiffxError(f"overwrite={cfg.overwrite}: expected true or false")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise DiffxError(f"device={cfg.device}: CUDA is not available here; use device=cpu or device=auto")
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx sample ckpt=runs/<run>/model.safetensors")
    if "precision" in cfg:
        from diffx import precision

        precision.check(cfg.precision)
    for key in ("sampler", "grid"):
        check_params(cfg[key], key)
    # Header and metadata only: a wrong or corrupt file fails before any weight is read. Whether the
    # model is conditional (for cfg) is the condition source's call, made in sample() once it is built.
    header = checkpoint.read_header(cfg.ckpt)
    plan = sampling_plan(cfg, schedules.FlowLinear(), header.sampling)  # the stand-in's times are not used
    if "init_image" in cfg:
        _check_image_inputs(cfg, plan)
    return plan


def _check_image_inputs(cfg: DictConfig, plan) -> None:
    """``diffx sample``'s img2img and inpainting keys: the files exist, strength and resample are in range,
    and a mask, a strength or a resample count comes with an image to start from."""
    from diffx.generate import check_start

    _check_numbers(cfg, _IMAGE_NUMBERS)
    for key in ("init_image", "mask"):
        if cfg[key] is not None and not Path(str(cfg[key])).expanduser().is_file():
            raise DiffxError(f"{key}={cfg[key]}: no such file; expected an image file")
    if cfg.init_image is None:
        given = [k for k, unset in (("mask", None), ("strength", None), ("resample", 1)) if cfg[k] != unset]
        if given:
            raise DiffxError(f"{given[0]}={cfg[given[0]]} needs init_image=PATH, the image to start from")
        return
    if cfg.resample > 1 and cfg.mask is None:
        raise DiffxError(f"resample={cfg.resample} is RePaint's resampling for inpainting: it needs mask=PATH")
    check_start(plan)


def _check_interpolate(cfg: DictConfig) -> None:
    """``diffx sample``'s checks on its own keys, then: two seeds, at least two frames, one label or prompt
    or a pair of them, and a deterministic sampler."""
    from diffx.interpolate import check_plan

    plan = _check_sample(cfg, _INTERPOLATE_NUMBERS)
    seeds = cfg.seeds
    if not (OmegaConf.is_list(seeds) and len(seeds) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise DiffxError(f"seeds={seeds}: expected a pair of seeds >= 0, e.g. seeds=[0,1]")
    for key in ("label", "prompt"):
        v = cfg[key]
        if v == "all" or (OmegaConf.is_list(v) and not 1 <= len(v) <= 2):
            raise DiffxError(f"{key}={v}: expected one {key} or a pair [a, b], one for each end")
    check_plan(plan)


def _check_calibrate(cfg: DictConfig) -> None:
    """``diffx sample``'s checks, then: the base sampler's plan can be made (a fitted solver's steps
    agree with ``steps``) and the sampler declares itself deterministic, so it can be traced."""
    if not isinstance(cfg.learn_times, bool):
        raise DiffxError(f"learn_times={cfg.learn_times}: expected true or false")
    steps = cfg.steps
    if isinstance(steps, ListConfig):  # several NFE fitted at once from shared reference solves
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise DiffxError(f"steps={list(steps)}: expected a positive integer or a list of them, e.g. [5,10,20]")
    for one_steps in (list(steps) if isinstance(steps, ListConfig) else [steps]):
        one = cfg.copy()
        one.steps = one_steps
        plan = _check_sample(one, _CALIBRATE_NUMBERS)
        if not plan.deterministic:
            raise DiffxError(f"sampler={plan.name} is stochastic: calibrate starts from a deterministic sampler, "
                             "whose steps are a linear map of the start noise")


def _check_other(cfg: DictConfig) -> None:
    """Any other command (``diffx eval``): required values, the sampler's keys and plan, the checkpoint's header."""
    from diffx import checkpoint, schedules
    from diffx.generate import sampling_plan

    _check_missing(cfg)
    for key in ("sampler", "grid"):
        if isinstance(cfg.get(key), DictConfig):
            check_params(cfg[key], key)
    header = checkpoint.read_header(cfg.ckpt) if isinstance(cfg.get("ckpt"), str) else None
    if isinstance(cfg.get("sampler"), DictConfig) and isinstance(cfg.get("grid"), DictConfig):
        sampling_plan(cfg, schedules.FlowLinear(), None if header is None else header.sampling)


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
        if v is None and key in _NULLABLE:
            continue
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


def _dry_build(cfg: DictConfig) -> None:
    """Run the parts' own shape and option checks now: schedule and objective are cheap to build
    for real; the model is built on the meta device, which allocates no memory."""
    import torch
    from hydra.utils import get_object, instantiate

    schedule = instantiate(cfg.schedule)
    instantiate(cfg.objective, schedule=schedule)
    instantiate(cfg.lr_schedule, warmup=cfg.train.warmup, total=cfg.train.steps)
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
