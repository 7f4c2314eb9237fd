"""Datasets -> training data: images in [-1, 1] with an optional class label and caption.

Each builder makes a Hugging Face `datasets.Dataset` with columns image (`datasets.Image`),
label and caption; `_hold` then decodes it once into one uint8 tensor in memory, because
training reads thousands of small images a second on CPU and per-item decoding would cost more
than the model step.

Builders (one per `conf/data/*.yaml`):
- `shapes`: the procedural shapes of `diffx.shapes`, label = (shape, colour), caption = attributes;
  rendered once and cached as Arrow (PNG bytes: ~5 MB for 20k images at 32x32).
- `imagefolder`: a folder of images, class subfolders optional.
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
from PIL import Image, ImageOps

from diffx import shapes as shape_rules
from diffx.atomic import atomic_dir
from diffx.errors import DiffxError
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


def _hold(ds: datasets.Dataset, size: int, class_names: list[str], on_error: str = "raise",
          where: str = "data") -> ImageData:
    """Decode every row of `ds` to RGB, centre-crop to a square, resize to `size`, and hold it.

    Unreadable images stop with a DiffxError naming the file (on_error="raise") or are dropped
    with one warning that counts them (on_error="skip"). `where` prefixes messages.
    """
    # Undecoded {"bytes", "path"} refs: we decode, to catch errors per file and to fit the size.
    refs = ds.cast_column("image", datasets.Image(decode=False)).select_columns(["image"]).to_dict()["image"]
    pixels, kept, bad = [], [], []
    with work(f"decoding {len(refs)} images", len(refs)) as advance:
        for i, ref in enumerate(refs):
            advance()
            try:
                with Image.open(io.BytesIO(ref["bytes"]) if ref["bytes"] else ref["path"]) as im:
                    fitted = fit(im, size)
            # PIL reports a broken file as any of these, depending on the format and where it breaks.
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if on_error == "raise":
                    raise DiffxError(f"{where}: cannot read image {ref['path'] or f'row {i}'} ({e}); "
                                     "expected a valid image file (or set data.on_error=skip)") from e
                bad.append(ref["path"] or f"row {i}")
                continue
            pixels.append(np.asarray(fitted, dtype=np.uint8))
            kept.append(i)
    if bad:
        warnings.warn(f"{where}: skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}", stacklevel=3)
    if not kept:
        raise DiffxError(f"{where}: none of the {len(ds)} image files could be read; "
                         "expected at least one valid image")
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    meta = ds.select_columns(["label", "caption"]).to_dict()
    labels, captions = meta["label"], meta["caption"]
    return ImageData(
        dataset=HeldImages(images, torch.tensor([labels[i] for i in kept]), [captions[i] for i in kept]),
        channels=images.shape[1],
        image_size=size,
        num_classes=len(class_names),
        class_names=list(class_names),
    )


def shapes(
    size: int = 32,
    n: int = 20000,
    seed: int = 0,
    shapes=shape_rules.SHAPES,
    colors=shape_rules.COLORS,
    cache_dir: str | None = None,
) -> ImageData:
    """Procedural shapes: one shape per image, label = (shape, colour) pair, attributes as caption.

    Deterministic in (size, n, seed, shapes, colors); rendered once, then loaded from the Arrow
    cache at `cache_dir/<hash of params>` (default `~/.cache/diffx/shapes`).
    """
    shape_names, color_names = shape_rules.check(shapes, colors)
    if size < 8 or n < 1:
        raise DiffxError(f"data.size={size}, data.n={n}: expected size >= 8 and n >= 1")
    params = {"size": int(size), "n": int(n), "seed": int(seed), "shapes": list(shape_names),
              "colors": list(color_names), "version": _SHAPES_VERSION}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir or "~/.cache/diffx/shapes").expanduser() / key
    if not root.exists():
        _save_atomically(_render_shapes(params), root)
    class_names = [f"{c} {s}" for s in shape_names for c in color_names]
    return _hold(datasets.load_from_disk(str(root)), size, class_names, where=f"shapes cache {root}")


def _render_shapes(params: dict) -> datasets.Dataset:
    """Draw n images with i.i.d. uniform attributes; the columns keep the attributes as text."""
    size, n, shapes, colors = params["size"], params["n"], params["shapes"], params["colors"]
    rng = np.random.default_rng(params["seed"])
    sizes, positions = list(shape_rules.SIZES), list(shape_rules.POSITIONS)
    s_idx, c_idx = rng.integers(len(shapes), size=n), rng.integers(len(colors), size=n)
    z_idx, p_idx = rng.integers(len(sizes), size=n), rng.integers(len(positions), size=n)
    jitter = rng.uniform(-shape_rules.JITTER, shape_rules.JITTER, size=(n, 2))
    attrs = [{"shape": shapes[a], "color": colors[b], "size": sizes[c], "position": positions[d]}
             for a, b, c, d in zip(s_idx, c_idx, z_idx, p_idx)]
    with work(f"rendering {n} shapes at {size}x{size} (cached for later runs)", n) as advance:
        images = []
        for a, j in zip(attrs, jitter):
            images.append(_png(shape_rules.render(a, size, j)))
            advance()
    columns = {
        "image": images,
        "label": s_idx * len(colors) + c_idx,
        "caption": [shape_rules.caption(a) for a in attrs],
        **{k: [a[k] for a in attrs] for k in ("shape", "color", "size", "position")},
    }
    features = datasets.Features({**_FEATURES, **{k: datasets.Value("string") for k in attrs[0]}})
    info = datasets.DatasetInfo(description=json.dumps({"diffx.data.shapes": params}), features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


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


def imagefolder(path: str, size: int = 32, on_error: str = "skip") -> ImageData:
    """Images from a folder: class subfolders (sorted names -> labels) or images directly in it
    (unconditional). Each is converted to RGB, centre-cropped to a square and resized to `size`.
    A sibling `<image stem>.txt` file, if present, is its caption.

    on_error: "skip" drops unreadable files with one warning that counts them; "raise" stops at
    the first, naming it.
    """
    if on_error not in ("skip", "raise"):
        raise DiffxError(f"data.on_error={on_error}: expected 'skip' or 'raise'")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DiffxError(f"data.path={path}: not a directory; expected a folder of images "
                         "(optionally in class subfolders)")
    files, labels, class_names = _list_images(root)
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": labels, "caption": [_sidecar_caption(f) for f in files]},
        features=datasets.Features(_FEATURES),
    )
    return _hold(ds, size, class_names, on_error, where=f"data.path={path}")


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
