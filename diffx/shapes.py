"""The render rules of the procedural shapes dataset, and their inverse.

An image holds one shape (circle, square, triangle, diamond) of one named colour, at one of two
sizes and one of nine named positions, on a fixed near-black background. `render` draws it;
`read` recovers all four attributes from pixels alone, by the same rules, so that generated
images can be scored for prompt adherence without a learned classifier. `caption` and
`parse_caption` map attributes to and from text like "a small red circle at the top left".

Geometry, in units of the image side: every shape fills the box [-r, r]^2 around its anchor
(the triangle points up), with r = 1/8 (small) or 1/5 (large). Anchors sit at 1/4, 1/2, 3/4 on
each axis rather than at the 3x3 cell centres (1/6, 1/2, 5/6), so that a large shape plus
jitter never leaves the image: a clipped shape would change area, centroid and moments.
"""

import re

import numpy as np

from diffx.errors import DiffxError

# Named colours a dataset may use (RGB). Chosen far apart in hue *and* in direction from the
# background, because the reader matches anti-aliased pixels along background->colour lines.
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 50),
    "magenta": (220, 60, 220),
    "cyan": (50, 210, 230),
    "orange": (250, 140, 20),
    "purple": (140, 60, 200),
    "white": (235, 235, 235),
}
BACKGROUND = (16, 16, 16)

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")

# Half-width r of the shape's box, as a fraction of the image side.
SIZES = {"small": 1 / 8, "large": 1 / 5}

# Anchor (x, y) as fractions of the image side; y grows downwards. Name -> caption phrase.
POSITIONS = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
PHRASES = {name: ("in the" if name == "center" else "on the" if name in ("left", "right") else "at the")
            for name in POSITIONS}

# Largest jitter of the anchor on each axis, as a fraction of the image side: enough that no two
# images of one attribute set are identical, small enough that the reader's cells stay apart.
JITTER = 1 / 40

# 4x4 subsamples per pixel: anti-aliasing that keeps small shapes recognisable at 16x16.
SUPERSAMPLE = 4


# Point-in-shape tests for the unit shapes, in box coordinates (u, v) in [-1, 1], v downwards.
_INSIDE = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= 1),
    "triangle": lambda u, v: (v <= 1) & (2 * np.abs(u) <= v + 1),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
}
# Area of each unit shape, and its centroid's offset below the box centre (the triangle's
# mass sits low: its centroid is 2/3 of the way down from the apex).
_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
_CENTROID_V = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "diamond": 0.0}
KNOWN_SHAPES = tuple(_INSIDE)

def check(shapes=SHAPES, colors=COLORS) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Validate shape and colour names against the render rules; return them as tuples."""
    shapes, colors = tuple(str(s) for s in shapes), tuple(str(c) for c in colors)
    for kind, names, known in (("shapes", shapes, KNOWN_SHAPES), ("colors", colors, tuple(PALETTE))):
        unknown = [n for n in names if n not in known]
        if unknown or not names or len(set(names)) != len(names):
            raise DiffxError(f"data.{kind}={list(names)}: expected distinct names from {list(known)}")
    return shapes, colors


def render(attrs: dict, image_size: int, jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Draw one shape; attrs has keys shape, color, size, position. Returns uint8 (H, W, 3).

    `jitter` shifts the anchor by (dx, dy) fractions of the image side, each within +-JITTER.
    """
    s = image_size
    ax, ay = POSITIONS[attrs["position"]]
    alpha = coverage(attrs["shape"], SIZES[attrs["size"]] * s, (ax + jitter[0]) * s, (ay + jitter[1]) * s, s)
    bg, fg = np.array(BACKGROUND, float), np.array(PALETTE[attrs["color"]], float)
    return np.rint(bg + alpha[..., None] * (fg - bg)).astype(np.uint8)


def coverage(shape: str, r: float, cx: float, cy: float, image_size: int) -> np.ndarray:
    """(S, S) fraction of each pixel inside ``shape`` with box half-width ``r`` anchored at (cx, cy),
    all in pixels; pixel i covers [i, i + 1), sampled at SUPERSAMPLE^2 points."""
    s, k = image_size, SUPERSAMPLE
    grid = (np.arange(s * k) + 0.5) / k
    inside = _INSIDE[shape]((grid[None, :] - cx) / r, (grid[:, None] - cy) / r)
    return inside.reshape(s, k, s, k).mean(axis=(1, 3))  # (s*k, s*k) -> (s, s)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool (H, W) mask: labels 1..n (0 outside), and n."""
    h, w = mask.shape
    label, n = np.zeros((h, w), dtype=np.int32), 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        n += 1
        label[y0, x0], stack = n, [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[yy, xx] and not label[yy, xx]:
                        label[yy, xx] = n
                        stack.append((yy, xx))
    return label, n


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One pixel of 8-connected growth (a 3x3 max filter)."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([p[dy: dy + h, dx: dx + w] for dy in range(3) for dx in range(3)], axis=0)


# A pixel at least half covered is the shape's core; its 1-pixel ring holds the anti-aliased edge.
_CORE = 0.5
# Template residual above which a blob is "no match": sum |coverage - template| over the shape's
# area, after the pixel noise's expected share is taken out. Clean renders at every size, shape,
# colour and jitter sit below 0.05 (pixel noise sigma 12 included, scripts/bench_reader.py); a
# circle missing a quarter, a half-drawn triangle or two shapes fused sit well above.
MATCH_TOL = 0.25
# A second blob counts as another object when it holds at least half the smallest shape's area.
_OBJECT_SHARE = 0.5
_BLANK = {"shape": None, "color": None, "size": None, "position": None}


def examine(image: np.ndarray, shapes=SHAPES, colors=COLORS) -> dict:
    """``read``'s attributes plus what makes a reading trustworthy: ``objects`` (shape-sized blobs),
    ``mismatch`` (the residual against a clean render of what was read) and ``noise`` (the
    pixel noise, as a standard deviation of coverage, estimated from the background).

    1. Colour: each pixel is bg + alpha * (colour - bg); the colour whose line explains all pixels
       with the least residual wins, which is immune to the dimming of anti-aliased edges.
    2. Objects: blobs of pixels at least half covered (8-connected); the heaviest one is the shape,
       read with its 1-pixel ring. The coverage there is not clipped, so zero-mean pixel noise
       leaves the moments unbiased, and noise elsewhere in the image does not enter at all.
    3. Shape: each candidate is rendered where the blob's centroid and area put it (``_fit``); the
       one closest to the blob wins. A clean render of the same shape leaves no residual; pixel
       noise leaves a share the background's noise level predicts, which is taken out.
    4. Size from the area of that shape; position from the anchor (the centroid less the shape's
       centroid offset).
    5. Match: if even the best shape differs from the blob by more than ``MATCH_TOL`` of its area,
       the blob fits no shape and reads as shape None ("no match").
    """
    img = np.asarray(image, dtype=float)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise DiffxError(f"shapes.read: expected a square (H, W, 3) image, got shape {img.shape}")
    s = img.shape[0]
    v = img - np.array(BACKGROUND, float)  # (H, W, 3)

    best = None  # 1. colour
    for name in colors:
        u = np.array(PALETTE[name], float) - np.array(BACKGROUND, float)
        a = v @ u / (u @ u)  # (H, W), unclipped
        residual = ((v - np.clip(a, 0.0, 1.0)[..., None] * u) ** 2).sum()
        if best is None or residual < best[0]:
            best = (residual, name, a)
    _, color, a = best

    label, n = _components(a >= _CORE)  # 2. objects
    masses = np.array([np.clip(a[label == i], 0, 1).sum() for i in range(1, n + 1)])
    smallest = min(_AREA[k] for k in shapes) * (SIZES["small"] * s) ** 2
    objects = int((masses >= _OBJECT_SHARE * smallest).sum())
    if n == 0:
        return {**_BLANK, "objects": 0, "mismatch": 0.0, "noise": 0.0}
    region = _dilate(label == 1 + int(masses.argmax()))
    alpha = np.where(region, a, 0.0)
    area = alpha.sum()
    if area < 1.0:
        return {**_BLANK, "objects": objects, "mismatch": 0.0, "noise": 0.0}

    c = np.arange(s) + 0.5  # 3. shape
    mx, my = (alpha * c[None, :]).sum() / area, (alpha * c[:, None]).sum() / area
    background = ~_dilate(_dilate(a >= _CORE))
    noise = 1.4826 * float(np.median(np.abs(a[background]))) if background.sum() >= 16 else 0.0
    fits = {k: _fit(k, alpha, region, area, mx, my, noise) for k in shapes}
    shape = min(fits, key=lambda k: fits[k][0])
    mismatch, r = fits[shape]

    size = min(SIZES, key=lambda k: abs(np.log(r / (SIZES[k] * s))))  # 4. size and position
    ax, ay = mx / s, (my - _CENTROID_V[shape] * r) / s
    position = min(POSITIONS, key=lambda k: (ax - POSITIONS[k][0]) ** 2 + (ay - POSITIONS[k][1]) ** 2)
    if mismatch > MATCH_TOL:
        shape, size = None, None
    return {"shape": shape, "color": color, "size": size, "position": position,
            "objects": objects, "mismatch": mismatch, "noise": noise}


def _fit(shape: str, alpha: np.ndarray, region: np.ndarray, area: float, mx: float, my: float,
         noise: float) -> tuple[float, float]:
    """(mismatch, r) of ``shape`` for a blob of coverage ``alpha`` (zero outside ``region``) with this
    area and centroid: the shape's box half-width r from the area, its render at the anchor the
    centroid implies, and sum |coverage - render| over the blob and the render, less the noise's
    expected share, over the render's area."""
    r = float(np.sqrt(area / _AREA[shape]))
    template = coverage(shape, r, mx, my - _CENTROID_V[shape] * r, alpha.shape[0])
    compared = region | (template > 0)
    # E|clip(c + n, 0, 1) - c| for c in {0, 1} and n ~ N(0, noise^2) is noise * sqrt(2 / pi) / 2 ~ 0.4 noise.
    excess = np.abs(np.clip(alpha, 0, 1) - template)[compared].sum() - 0.4 * noise * compared.sum()
    return max(0.0, float(excess)) / float(template.sum()), r


def read(image: np.ndarray, shapes=SHAPES, colors=COLORS) -> dict:
    """Recover {shape, color, size, position} from a uint8 (H, W, 3) image by the render rules
    (``examine``). Only the given shapes and colours are candidates. A blank image reads as all None;
    a blob that fits no shape reads as shape and size None."""
    found = examine(image, shapes, colors)
    return {k: found[k] for k in _BLANK}


def caption(attrs: dict) -> str:
    """'a small red circle at the top left' for the given attributes."""
    pos = attrs["position"]
    return f"a {attrs['size']} {attrs['color']} {attrs['shape']} {PHRASES[pos]} {pos}"


_CAPTION = re.compile(
    rf"an? ({'|'.join(SIZES)}) ({'|'.join(PALETTE)}) ({'|'.join(KNOWN_SHAPES)}) "
    rf"(?:at|on|in) the ({'|'.join(sorted(POSITIONS, key=len, reverse=True))})"
)


def parse_caption(text: str) -> dict:
    """Inverse of `caption`: {shape, color, size, position}. Case and a final '.' are ignored."""
    m = _CAPTION.fullmatch(" ".join(text.lower().split()).rstrip("."))
    if m is None:
        raise DiffxError(f"caption {text!r}: expected e.g. {caption(_EXAMPLE)!r}")
    size, color, shape, position = m.groups()
    return {"shape": shape, "color": color, "size": size, "position": position}


_EXAMPLE = {"shape": "circle", "color": "red", "size": "small", "position": "top left"}
