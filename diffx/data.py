"""Datasets -> training data: images in [-1, 1] with an optional class label and caption.

Each builder makes a Hugging Face `datasets.Dataset` with columns image (`datasets.Image`),
label and caption; `_hold` then decodes it once into one uint8 tensor in memory, because
training reads thousands of small images a second on CPU and per-item decoding would cost more
than the model step.

Data beyond RAM (`data.stream=true`): `_stream` keeps the Arrow table memory-mapped and decodes
each item in `__getitem__` (so inside the DataLoader workers with `train.num_workers > 0`); only
the labels and captions are held. Items equal `HeldImages`' pixel for pixel. Unreadable files are
found up front by opening every header (no pixel decoding) and dropped (on_error=skip) or named
(on_error=raise); a file whose header reads but whose pixels do not stops training, naming it.

Builders (one per `conf/data/*.yaml`):
- `shapes`: the procedural shapes of `diffx.shapes`, label = (shape, colour), caption = attributes;
  rendered once and cached as Arrow (PNG bytes: ~5 MB for 20k images at 32x32).
- `imagefolder`: a folder of images, class subfolders optional. Streamed, each item is decoded
  from its path (the index of paths, labels and captions is small and held; no copy is made).
- `hf`: a `datasets.Dataset` saved with `save_to_disk` (a `DatasetDict` with `split=`) or a folder
  of parquet files, with an image column and optional label and caption columns.
"""

import contextlib
import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from omegaconf import ListConfig
from PIL import Image, ImageOps

from diffx import shapes as shape_rules
from diffx.atomic import atomic_dir
from diffx.captions import captions as describe_all
from diffx.errors import DiffxError
from diffx import holdout as holdouts
from diffx.progress import work

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Bump when the render rules change, so that caches of old renders are not reused.
_SHAPES_VERSION = 1

_FEATURES = {"image": datasets.Image(), "label": datasets.Value("int64"), "caption": datasets.Value("string")}


@dataclass
class ImageData:
    """What training needs to know about its data; the model's shape kwargs come from here."""

    dataset: torch.utils.data.Dataset  # item -> {"x": (C, H, W) in [-1, 1], "label": int, "caption": str}
    channels: int
    image_size: int
    num_classes: int  # 0 = unconditional data
    class_names: list[str]  # len == num_classes


class HeldImages(torch.utils.data.Dataset):
    """Images held as one uint8 (N, C, H, W) tensor, with labels and captions; items in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, captions: list[str]):
        self.images, self.labels, self.captions = images, labels, captions

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        """sha256 of the pixels: the key of cached encodings of this exact data (diffx.latent)."""
        return hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float() / 127.5 - 1.0
        return {"x": x, "label": int(self.labels[i]), "caption": self.captions[i]}


def fit(im: Image.Image, size: int, mode: str = "RGB") -> Image.Image:
    """``im`` converted to ``mode``, centre-cropped to a square and resized to ``size`` x ``size``
    (Lanczos): how every image enters diffx, as training data and as a sampling input (``init_image=``,
    ``mask=``). A no-op copy when the image already has the target size (shapes)."""
    return ImageOps.fit(im.convert(mode), (size, size), Image.Resampling.LANCZOS)


def _open(ref: dict):
    """A PIL image from an undecoded ``{"bytes", "path"}`` ref (lazy: only the header is read)."""
    return Image.open(io.BytesIO(ref["bytes"]) if ref["bytes"] else ref["path"])


def _pixels(ref: dict, size: int) -> np.ndarray:
    """(H, W, 3) uint8: the image of ``ref`` fitted to ``size``; the one decoding both paths share."""
    with _open(ref) as im:
        return np.array(fit(im, size), dtype=np.uint8)  # a writable copy: torch.from_numpy takes it as is


def _name(ref: dict, i: int) -> str:
    return ref["path"] or f"row {i}"


def _refs(ds: datasets.Dataset) -> datasets.Dataset:
    """The image column alone, as undecoded ``{"bytes", "path"}`` refs (we decode, to catch errors
    per file and to fit the size)."""
    return ds.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])


def _image_data(dataset, size: int, class_names: list[str]) -> ImageData:
    return ImageData(dataset=dataset, channels=3, image_size=size, num_classes=len(class_names),
                     class_names=list(class_names))


def _dropped(bad: list[str], n: int, where: str) -> None:
    if bad:
        warnings.warn(f"{where}: skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}", stacklevel=4)
    if len(bad) == n:
        raise DiffxError(f"{where}: none of the {n} image files could be read; "
                         "expected at least one valid image")


# PIL reports a broken file as any of these, depending on the format and where it breaks.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _header(ref: dict) -> tuple[int, int]:
    """The image's size, from its header alone (no pixels decoded)."""
    with _open(ref) as im:
        return im.size


def _read(read, ref: dict, i: int, on_error: str, where: str, bad: list[str]):
    """``read(ref)``, or None for an unreadable image: a DiffxError naming it (on_error="raise"),
    else its name appended to ``bad``."""
    try:
        return read(ref)
    except _UNREADABLE as e:
        if on_error == "raise":
            raise DiffxError(f"{where}: cannot read image {_name(ref, i)} ({e}); "
                             "expected a valid image file (or set data.on_error=skip)") from e
        bad.append(_name(ref, i))
        return None


def _hold(ds: datasets.Dataset, size: int, class_names: list[str], on_error: str = "raise",
          where: str = "data", source: str | None = None) -> ImageData:
    """Decode every row of `ds` to RGB, centre-crop to a square, resize to `size`, and hold it.

    Unreadable images stop with a DiffxError naming the file (on_error="raise") or are dropped
    with one warning that counts them (on_error="skip"). `where` prefixes messages; `source` is
    `_stream`'s (held pixels are their own fingerprint).
    """
    refs = _refs(ds).to_dict()["image"]
    pixels, kept, bad = [], [], []
    with work(f"decoding {len(refs)} images", len(refs)) as advance:
        for i, ref in enumerate(refs):
            advance()
            if (fitted := _read(lambda r: _pixels(r, size), ref, i, on_error, where, bad)) is not None:
                pixels.append(fitted)
                kept.append(i)
    _dropped(bad, len(refs), where)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    meta = ds.select_columns(["label", "caption"]).to_dict()
    labels, captions = meta["label"], meta["caption"]
    held = HeldImages(images, torch.tensor([labels[i] for i in kept]), [captions[i] for i in kept])
    return _image_data(held, size, class_names)


class StreamedImages(torch.utils.data.Dataset):
    """Images decoded item by item from a memory-mapped Arrow dataset; the same items as
    `HeldImages` (pixel for pixel), only the labels and captions held in memory.

    ``rows`` maps item i to its row of ``refs`` (the readable ones); ``source`` identifies the
    data for ``fingerprint`` (e.g. the Arrow dataset's fingerprint, or file sizes and times)."""

    def __init__(self, refs: datasets.Dataset, rows: list[int], labels: list[int], captions: list[str],
                 size: int, source: str, where: str):
        self.refs, self.rows, self.size, self.source, self.where = refs, rows, size, source, where
        self.labels, self.captions = torch.tensor(labels, dtype=torch.long), captions

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        """A cheap key of this exact data (diffx.latent): the source, the size and the kept rows."""
        key = json.dumps({"source": self.source, "size": self.size, "rows": self.rows})
        return hashlib.sha256(key.encode()).hexdigest()

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        ref = self.refs[row]["image"]
        try:
            pixels = _pixels(ref, self.size)
        except _UNREADABLE as e:
            raise DiffxError(f"{self.where}: cannot decode image {_name(ref, row)} ({e}); data.stream=true "
                             "needs files whose pixels read: fix or remove it, or use data.stream=false") from e
        x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0  # (C, H, W) in [-1, 1]
        return {"x": x, "label": int(self.labels[i]), "caption": self.captions[i]}


def _stream(ds: datasets.Dataset, size: int, class_names: list[str], on_error: str = "raise",
            where: str = "data", source: str | None = None) -> ImageData:
    """`ds` kept as it is (memory-mapped when it was loaded from disk) and decoded per item.

    Every image's header is opened once up front, without decoding its pixels: the unreadable ones
    are dropped then (on_error="skip", with one warning) or named (on_error="raise"), so the length
    never changes while training. `source` (default: the Arrow fingerprint) keys `fingerprint`."""
    refs = _refs(ds)
    kept, bad = [], []
    with work(f"checking {len(refs)} image headers", len(refs)) as advance:
        for lo, batch in zip(range(0, len(refs), 1024), refs.iter(batch_size=1024)):
            for i, ref in enumerate(batch["image"], start=lo):
                advance()
                if _read(_header, ref, i, on_error, where, bad) is not None:
                    kept.append(i)
    _dropped(bad, len(refs), where)
    meta = ds.select_columns(["label", "caption"]).to_dict()
    streamed = StreamedImages(refs, kept, [meta["label"][i] for i in kept], [meta["caption"][i] for i in kept],
                              size, source or ds._fingerprint, where)
    return _image_data(streamed, size, class_names)


def _load(stream: bool):
    """The in-memory fast path (`_hold`) or the streaming one (`_stream`, data.stream=true)."""
    return _stream if stream else _hold


def shapes(
    size: int = 32,
    n: int = 20000,
    seed: int = 0,
    shapes=shape_rules.SHAPES,
    colors=shape_rules.COLORS,
    cache_dir: str | None = None,
    stream: bool = False,
    captions: str = "template",
    holdout=None,
) -> ImageData:
    """Procedural shapes: one shape per image, label = (shape, colour) pair, attributes as caption.

    Deterministic in (size, n, seed, shapes, colors, captions, holdout); rendered once, then loaded
    from the Arrow cache at `cache_dir/<hash of params>` (default `~/.cache/diffx/shapes`).
    stream=true decodes each item from the memory-mapped cache instead of holding all of them
    (`_stream`). captions: `template` (one grammar) or `augmented` (several phrasings and synonyms,
    diffx.captions); holdout: attribute combinations never drawn (diffx.holdout).
    """
    shape_names, color_names = shape_rules.check(shapes, colors)
    if size < 8 or n < 1:
        raise DiffxError(f"data.size={size}, data.n={n}: expected size >= 8 and n >= 1")
    if captions not in ("template", "augmented"):
        raise DiffxError(f"data.captions={captions!r}: expected template or augmented")
    holdout = list(holdout) if isinstance(holdout, (list, tuple, ListConfig)) else holdout
    excluded = holdouts.held_out(holdout, shape_names, color_names, int(seed))  # checks data.holdout
    params = {"size": int(size), "n": int(n), "seed": int(seed), "shapes": list(shape_names),
              "colors": list(color_names), "version": _SHAPES_VERSION,
              # only when set, so that the caches (and images) of earlier versions stay valid
              **({"captions": captions} if captions != "template" else {}),
              **({"holdout": [list(holdouts.key(a)) for a in excluded]} if excluded else {})}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir or "~/.cache/diffx/shapes").expanduser() / key
    if not root.exists():
        _save_atomically(_render_shapes(params), root)
    class_names = [f"{c} {s}" for s in shape_names for c in color_names]
    return _load(stream)(datasets.load_from_disk(str(root)), size, class_names, where=f"shapes cache {root}")


def _render_shapes(params: dict) -> datasets.Dataset:
    """Draw n images with i.i.d. uniform attributes; the columns keep the attributes as text."""
    size, n, shapes, colors = params["size"], params["n"], params["shapes"], params["colors"]
    rng = np.random.default_rng(params["seed"])
    sizes, positions = list(shape_rules.SIZES), list(shape_rules.POSITIONS)
    if "holdout" not in params:
        s_idx, c_idx = rng.integers(len(shapes), size=n), rng.integers(len(colors), size=n)
        z_idx, p_idx = rng.integers(len(sizes), size=n), rng.integers(len(positions), size=n)
        attrs = [{"shape": shapes[a], "color": colors[b], "size": sizes[c], "position": positions[d]}
                 for a, b, c, d in zip(s_idx, c_idx, z_idx, p_idx)]
    else:  # uniform over the combinations that are not held out
        excluded = {tuple(k) for k in params["holdout"]}
        allowed = [a for a in holdouts.combinations(shapes, colors) if holdouts.key(a) not in excluded]
        attrs = [allowed[i] for i in rng.integers(len(allowed), size=n)]
    jitter = rng.uniform(-shape_rules.JITTER, shape_rules.JITTER, size=(n, 2))
    with work(f"rendering {n} shapes at {size}x{size} (cached for later runs)", n) as advance:
        images = []
        for a, j in zip(attrs, jitter):
            images.append(_png(shape_rules.render(a, size, j)))
            advance()
    columns = {
        "image": images,
        "label": [shapes.index(a["shape"]) * len(colors) + colors.index(a["color"]) for a in attrs],
        "caption": describe_all(attrs, params.get("captions", "template"), params["seed"]),
        **{k: [a[k] for a in attrs] for k in ("shape", "color", "size", "position")},
    }
    features = datasets.Features({**_FEATURES, **{k: datasets.Value("string") for k in attrs[0]}})
    info = datasets.DatasetInfo(description=json.dumps({"diffx.data.shapes": params}), features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


DIGIT_NAMES = [str(d) for d in range(10)]


def digits(size: int = 16) -> ImageData:
    """scikit-learn's bundled handwritten digits (UCI optdigits test set: 1797 images, 8x8, 17 grey
    levels, labels 0-9), grey, one channel, upsampled to ``size`` (bilinear); caption "the digit 3".

    Read from the file inside scikit-learn (the ``digits`` extra): nothing is downloaded, and it loads in
    milliseconds, so unlike ``shapes`` it is not cached. Always held in memory (it is 0.5 MB at 16x16).
    """
    try:
        from sklearn.datasets import load_digits  # optional: pip install -e ".[digits]"
    except ImportError as e:
        raise DiffxError('data=digits needs scikit-learn: pip install -e ".[digits]"') from e
    if size < 8:
        raise DiffxError(f"data.size={size}: expected size >= 8 (the digits are 8x8)")
    bunch = load_digits()
    grey = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8): 0..16 -> 0..255
    pixels = np.stack([np.array(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in grey])
    images = torch.from_numpy(pixels).unsqueeze(1).contiguous()  # (N, 1, size, size)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    held = HeldImages(images, labels, [f"the digit {d}" for d in bunch.target])
    return ImageData(dataset=held, channels=1, image_size=size, num_classes=10, class_names=list(DIGIT_NAMES))


def _png(pixels: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless, so the cache keeps exact pixels
    return {"bytes": buf.getvalue(), "path": None}


@contextlib.contextmanager
def _quiet():
    """No datasets progress bar inside diffx's own bar (it would interleave with it)."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def _save_atomically(ds: datasets.Dataset, root: Path) -> None:
    """Save next to `root`, then rename: an interrupted or concurrent build never leaves a
    half-written cache that a later call would trust (a concurrent build that got there first wins)."""

    def fill(tmp: Path) -> None:
        with _quiet():
            ds.save_to_disk(str(tmp))

    atomic_dir(root, fill, replace=False)


def imagefolder(path: str, size: int = 32, on_error: str = "skip", stream: bool = False) -> ImageData:
    """Images from a folder: class subfolders (sorted names -> labels) or images directly in it
    (unconditional). Each is converted to RGB, centre-cropped to a square and resized to `size`.
    A sibling `<image stem>.txt` file, if present, is its caption.

    on_error: "skip" drops unreadable files with one warning that counts them; "raise" stops at
    the first, naming it. stream=true decodes each image from its path per item (`_stream`): the
    files are the store, so nothing is copied; the fingerprint is the files' paths, sizes and times.
    """
    _check_on_error(on_error)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DiffxError(f"data.path={path}: not a directory; expected a folder of images "
                         "(optionally in class subfolders)")
    files, labels, class_names = _list_images(root)
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": labels, "caption": [_sidecar_caption(f) for f in files]},
        features=datasets.Features(_FEATURES),
    )
    # the files are the store: their paths, sizes and times key a streamed run's latent cache
    source = json.dumps([(str(f), *_stat(f)) for f in files]) if stream else None
    return _load(stream)(ds, size, class_names, on_error, where=f"data.path={path}", source=source)


def _stat(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "raise"):
        raise DiffxError(f"data.on_error={on_error}: expected 'skip' or 'raise'")


def hf(path: str, size: int = 32, image_column: str = "image", label_column: str | None = None,
       caption_column: str | None = None, split: str | None = None, stream: bool = False,
       on_error: str = "skip", cache_dir: str | None = None) -> ImageData:
    """A local Hugging Face dataset: a folder written by `Dataset.save_to_disk` (a `DatasetDict`'s:
    pick `split`, needed when it has several), or a folder of `*.parquet` files (converted once to
    Arrow under `cache_dir`, default the `datasets` cache). Nothing is downloaded.

    `image_column` holds images (a `datasets.Image` feature, bytes or paths); `label_column`, if
    set, gives the labels: a `ClassLabel` feature's names are the class names, else the sorted
    distinct values are; `caption_column`, if set, gives the captions. stream=true keeps the table
    memory-mapped and decodes per item (`_stream`).
    """
    _check_on_error(on_error)
    where = f"data.path={path}"
    ds = _open_hf(Path(path).expanduser(), split, cache_dir, where)
    for key, column in (("image_column", image_column), ("label_column", label_column),
                        ("caption_column", caption_column)):
        if column is not None and column not in ds.column_names:
            raise DiffxError(f"data.{key}={column}: no such column in {path}; expected one of {ds.column_names}")
    n = len(ds)
    if n == 0:
        raise DiffxError(f"{where}: the dataset has no rows; expected at least one image")
    labels, class_names = [-1] * n, []
    if label_column is not None:
        values = ds.select_columns([label_column]).to_dict()[label_column]
        feature = ds.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            labels, class_names = [int(v) for v in values], list(feature.names)
        else:
            class_names = sorted({str(v) for v in values})
            index = {name: k for k, name in enumerate(class_names)}
            labels = [index[str(v)] for v in values]
    captions = ds.select_columns([caption_column]).to_dict()[caption_column] if caption_column else [""] * n
    table = ds.select_columns([image_column])
    if image_column != "image":
        table = table.rename_column(image_column, "image")
    # add_column joins the small in-memory columns beside the memory-mapped image column (no copy)
    table = table.add_column("label", labels).add_column("caption", [str(c or "") for c in captions])
    return _load(stream)(table, size, class_names, on_error, where=where)


def _open_hf(root: Path, split: str | None, cache_dir: str | None, where: str) -> datasets.Dataset:
    """The dataset at `root`: `load_from_disk` output (memory-mapped) or parquet files."""
    if not root.is_dir():
        raise DiffxError(f"{where}: not a directory; expected a dataset saved with save_to_disk "
                         "or a folder of parquet files")
    parquet = sorted(str(f) for f in root.rglob("*.parquet"))
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        with _quiet():
            ds = datasets.load_from_disk(str(root))
    elif parquet:
        with _quiet():
            ds = datasets.Dataset.from_parquet(parquet, cache_dir=cache_dir)
    else:
        raise DiffxError(f"{where}: neither a save_to_disk folder (state.json, dataset_dict.json) nor a "
                         "folder of .parquet files")
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DiffxError(f"data.split={split}: {where} holds splits {sorted(ds)}; expected data.split= one of them")
        ds = ds[split]
    return ds


def _list_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files under `root` with labels: -1 for a flat folder, else the class subfolder's
    index among the sorted subfolders that hold images (at any depth)."""
    def images_in(d: Path, recursive: bool) -> list[Path]:
        found = d.rglob("*") if recursive else d.iterdir()
        return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                      and not any(part.startswith(".") for part in p.relative_to(root).parts))

    flat = images_in(root, recursive=False)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = {d.name: imgs for d in subdirs if (imgs := images_in(d, recursive=True))}
    if flat and classes:
        raise DiffxError(f"data.path={root}: found images both directly in it and in subfolders "
                         f"{sorted(classes)}; expected one or the other")
    if not flat and not classes:
        raise DiffxError(f"data.path={root}: no image files found; expected "
                         f"{'/'.join(IMAGE_EXTENSIONS)} files in it or in class subfolders")
    if flat:
        return flat, [-1] * len(flat), []
    names = sorted(classes)
    files = [f for name in names for f in classes[name]]
    labels = [k for k, name in enumerate(names) for _ in classes[name]]
    return files, labels, names


def _sidecar_caption(image: Path) -> str:
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
