"""Self-describing, code-free checkpoints: safetensors weights with the resolved config in the metadata.

One ``model.safetensors`` rebuilds the model: its metadata holds the model/latent/objective/
schedule/data configs, the shapes the data decided, the training step and the diffx version.
A checkpoint may come from the internet, so reading one trusts nothing in it: nothing is unpickled,
the header and metadata are checked against a schema, the stored config is data (every
``_target_`` must be one the shipped config tree names at that place, and no interpolation is
left for OmegaConf to resolve), and the weights must fit the model before any real memory is
spent on it. Every failure is one DiffxError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffx import __version__
from diffx.atomic import atomic_write
from diffx.build import DataSpec, Parts, build
from diffx.errors import DiffxError, first_line
from diffx.trust import check_config, check_params

FORMAT = "diffx.model/1"
REQUIRED_PARTS = ("model", "latent", "objective", "schedule")
# Bounds on what the data decides: a crafted spec must not ask sampling for absurd allocations.
_SPEC_MAX = {"channels": 64, "image_size": 16384, "num_classes": 1_000_000}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def save(path, weights: dict[str, torch.Tensor], parts: dict, spec: DataSpec, step: int,
         sampling: dict | None = None) -> None:
    """Write inference weights and everything needed to rebuild the model, atomically. ``sampling``: a
    distilled student's native plan, ``{"steps": N, "ts": [N + 1 times], "method": ...}`` (``diffx distill``),
    which ``diffx sample`` and ``diffx eval`` use when ``steps`` is null."""
    metadata = {
        "format": FORMAT,
        "diffx_version": __version__,
        "step": str(step),
        "config": json.dumps(parts),
        "spec": json.dumps(spec.to_dict()),
        **({"sampling": json.dumps(sampling)} if sampling else {}),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@dataclass
class Header:
    """What a checkpoint says about itself, read without loading a single weight."""

    path: Path
    parts: dict
    spec: DataSpec
    step: int
    version: str
    shapes: dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)
    sampling: dict | None = None  # a distilled student's native steps and grid (``save``)


@dataclass
class Checkpoint:
    parts: dict
    spec: DataSpec
    step: int
    version: str
    weights: dict[str, torch.Tensor]
    sampling: dict | None = None


def read_header(path) -> Header:
    """Open a checkpoint's header and check its metadata and stored config; no weights are read."""
    path = Path(path)
    where = f"ckpt={path}"
    if not path.is_file():
        raise DiffxError(f"{where}: no such file (expected a diffx model.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffxError(f"{where}: not a valid safetensors file, truncated or corrupted? ({first_line(e)}); "
                         "re-download or re-save it") from None
    parts, spec, step = _parse_metadata(meta, where)
    check_config(parts, where)
    _check_params(parts, where)
    return Header(path, parts, spec, step, meta["diffx_version"], shapes, _parse_sampling(meta, where))


def read(path) -> Checkpoint:
    """Read and validate a checkpoint and its weights; every failure is a DiffxError naming the file."""
    header = read_header(path)
    return Checkpoint(header.parts, header.spec, header.step, header.version, _read_weights(path), header.sampling)


def _read_weights(path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffxError(f"ckpt={path}: cannot read its weights ({first_line(e)}); re-download or re-save it") from None


def load(path, device=None) -> tuple[Parts, Checkpoint]:
    """Rebuild the parts from a checkpoint alone and load its weights into the model."""
    header = read_header(path)
    where = f"ckpt={path}"
    # The stored config decides the model's size: build it on the meta device first (no memory),
    # so a file whose weights do not match its config is refused before anything is allocated.
    with torch.device("meta"):
        skeleton = _build(header, where)
    check_weights({k: (tuple(v.shape), v.is_floating_point()) for k, v in skeleton.model.state_dict().items()},
                  header.shapes, where)
    ckpt = Checkpoint(header.parts, header.spec, header.step, header.version, _read_weights(path), header.sampling)
    # Latent spaces load their weights on the CPU even under the meta device (diffx.latent): reuse it,
    # so a VAE file is read and hashed once.
    parts = _build(header, where, latent=skeleton.latent)
    try:
        parts.model.load_state_dict(ckpt.weights, strict=True)
    except RuntimeError as e:
        raise DiffxError(f"{where}: weights do not fit its stored model config ({first_line(e)})") from None
    parts.model.to(device).eval().requires_grad_(False)
    parts.latent.to(device)
    return parts, ckpt


def check_weights(expected: dict[str, tuple[tuple, bool]], found: dict[str, tuple[tuple, str]], where: str) -> None:
    """The file's tensors (name -> shape, safetensors dtype) against the model built from its config
    (name -> shape, is floating point): the same names, the same shapes, float where the model is."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    common = sorted(expected.keys() & found.keys())
    wrong = [f"{k}: {list(found[k][0])} in the file, {list(expected[k][0])} in the model"
             for k in common if tuple(found[k][0]) != tuple(expected[k][0])]
    dtype = [f"{k}: {found[k][1]}" for k in common if (found[k][1] in _FLOAT_DTYPES) != expected[k][1]]
    problems = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})" for what, v in (
        ("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong),
        ("of the wrong dtype", dtype)) if v]
    if problems:
        raise DiffxError(f"{where}: weights do not fit its stored model config: {'; '.join(problems)}; "
                         "the file is corrupted, edited, or not this model's")


def _check_params(parts: dict, where: str) -> None:
    """Keys the (allowed) targets do not take, or of the wrong type: one line naming the key."""
    from omegaconf import OmegaConf

    for key, node in parts.items():
        # `data` is kept for the record and never instantiated from a checkpoint: importing its
        # builders (and `datasets`) on every load would buy nothing.
        if isinstance(node, dict) and node and key != "data":
            try:
                check_params(OmegaConf.create(node), key)
            except DiffxError as e:
                raise DiffxError(f"{where}: its stored config does not fit this diffx: {e}") from None


def _build(header: Header, where: str, latent=None) -> Parts:
    """``build()`` with every failure of the stored config turned into one line naming the file."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return build(header.parts, header.spec, latent)
    except DiffxError as e:
        raise DiffxError(f"{where}: its stored config does not build: {e}") from None
    except (InstantiationException, OmegaConfBaseException, TypeError, ValueError, RecursionError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, DiffxError) else e
        text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip()) or type(cause).__name__
        raise DiffxError(f"{where}: its stored config does not build ({text})") from None


def _parse_metadata(meta: dict, where: str) -> tuple[dict, DataSpec, int]:
    """The diffx metadata schema: format and version, required keys, JSON types and bounds."""
    fmt = meta.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("diffx.model/"):
            raise DiffxError(f"{where}: written in checkpoint format {fmt!r}, but diffx {__version__} reads "
                             f"{FORMAT!r}; use a diffx version that matches the file")
        raise DiffxError(f"{where}: metadata format is {fmt!r}, expected {FORMAT!r} (is this a diffx checkpoint?)")
    missing = [k for k in ("diffx_version", "step", "config", "spec") if k not in meta]
    _expect(not missing, where, f"metadata lacks {missing}")
    try:
        parts, spec_d = json.loads(meta["config"]), json.loads(meta["spec"])
        step = int(meta["step"])
    except (ValueError, RecursionError) as e:
        raise DiffxError(f"{where}: malformed diffx metadata ({first_line(e)}); the file is corrupted") from None
    _expect(step >= 0, where, f"metadata step={step} is negative")
    _expect(isinstance(parts, dict), where, "metadata config is not a JSON object")
    bad = [k for k in REQUIRED_PARTS if not isinstance(parts.get(k), dict)]
    _expect(not bad, where, f"metadata config lacks the {bad} section(s)")
    _expect(isinstance(spec_d, dict), where, "metadata spec is not a JSON object")
    spec = parse_spec(spec_d, where)
    return parts, spec, step


def _parse_sampling(meta: dict, where: str) -> dict | None:
    """A student's native plan: ``steps`` >= 1 and ``ts``, steps + 1 times falling from <= 1 to 0."""
    if "sampling" not in meta:
        return None
    try:
        d = json.loads(meta["sampling"])
    except (ValueError, RecursionError) as e:
        raise DiffxError(f"{where}: malformed metadata sampling ({first_line(e)}); the file is corrupted") from None
    ts, steps = d.get("ts") if isinstance(d, dict) else None, d.get("steps") if isinstance(d, dict) else None
    ok = (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 100_000 and isinstance(ts, list)
          and len(ts) == steps + 1 and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts)
          and ts[0] <= 1 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:])))
    _expect(ok, where, "metadata sampling is not {steps: N, ts: N + 1 decreasing times from <= 1 to 0}")
    return d


def parse_spec(d: dict, where: str) -> DataSpec:
    names = d.get("class_names", [])
    _expect(isinstance(names, list) and all(isinstance(n, str) for n in names), where,
            "metadata spec.class_names is not a list of strings")
    vocabulary = d.get("vocabulary", [])
    _expect(isinstance(vocabulary, list) and all(isinstance(w, str) for w in vocabulary), where,
            "metadata spec.vocabulary is not a list of strings")
    try:
        spec = DataSpec(**{**d, "class_names": tuple(names), "vocabulary": tuple(vocabulary)})
    except TypeError as e:
        raise DiffxError(f"{where}: metadata spec has the wrong keys ({first_line(e)})") from None
    for k, v in asdict(spec).items():
        if k not in ("class_names", "vocabulary"):
            ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _SPEC_MAX.get(k, 1_000_000)
            _expect(ok, where, f"metadata spec.{k}={v!r} is not an integer in 0..{_SPEC_MAX.get(k, 1_000_000)}")
    _expect(spec.channels >= 1 and spec.image_size >= 1, where, "metadata spec has zero channels or image size")
    _expect(not names or len(names) == spec.num_classes, where,
            f"metadata spec has {len(names)} class names for {spec.num_classes} classes")
    return spec


def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise DiffxError(f"{where}: {what}; the file is corrupted or not a diffx checkpoint")
