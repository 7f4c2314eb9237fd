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
_PHRASES = {name: ("in the" if name == "center" else "on the" if name in ("left", "right") else "at the")
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
# Scale-free moment signature of each unit shape, derived in closed form:
# skew = m_yyy / m_yy^1.5 (only the triangle is top-bottom asymmetric: -2*sqrt(2)/5), and
# q = m_xxyy / (m_xx * m_yy), which is 1 when x and y are independent (square), 2/3 for the
# disc, 4/5 for the triangle and 2/5 for the diamond (mass along the axes).
_SIGNATURE = {
    "circle": (0.0, 2 / 3),
    "square": (0.0, 1.0),
    "triangle": (-2 * np.sqrt(2) / 5, 0.8),
    "diamond": (0.0, 0.4),
}
KNOWN_SHAPES = tuple(_INSIDE)

# Pixels whose estimated coverage is below this are treated as background: it keeps faint noise
# in generated images from dragging moments, and costs clean renders only a sliver of edge.
_ALPHA_FLOOR = 0.1


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
    s, k = image_size, SUPERSAMPLE
    r = SIZES[attrs["size"]] * s
    ax, ay = POSITIONS[attrs["position"]]
    cx, cy = (ax + jitter[0]) * s, (ay + jitter[1]) * s
    # Pixel i covers [i, i + 1); subsample centres within it, in pixel units.
    grid = (np.arange(s * k) + 0.5) / k
    inside = _INSIDE[attrs["shape"]]((grid[None, :] - cx) / r, (grid[:, None] - cy) / r)
    alpha = inside.reshape(s, k, s, k).mean(axis=(1, 3))  # (s*k, s*k) -> (s, s) coverage
    bg, fg = np.array(BACKGROUND, float), np.array(PALETTE[attrs["color"]], float)
    return np.rint(bg + alpha[..., None] * (fg - bg)).astype(np.uint8)


def _main_blob(alpha: np.ndarray) -> np.ndarray:
    """Only the 8-connected region of nonzero coverage with the most coverage: one shape is drawn, so
    a stray speck elsewhere (a decoder's corner artefact, noise) must not drag the moments below."""
    h, w = alpha.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_mass, n = 0, 0.0, 0
    for y0, x0 in zip(*np.nonzero(alpha)):
        if label[y0, x0]:
            continue
        n += 1
        label[y0, x0], stack, mass = n, [(y0, x0)], 0.0
        while stack:
            y, x = stack.pop()
            mass += alpha[y, x]
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if alpha[yy, xx] > 0 and not label[yy, xx]:
                        label[yy, xx] = n
                        stack.append((yy, xx))
        if mass > best_mass:
            best, best_mass = n, mass
    return np.where(label == best, alpha, 0.0) if n > 1 else alpha


def read(image: np.ndarray, shapes=SHAPES, colors=COLORS) -> dict:
    """Recover {shape, color, size, position} from a uint8 (H, W, 3) image by the render rules.

    Only the given shapes and colours are candidates. A blank image reads as all None.
    """
    img = np.asarray(image, dtype=float)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise DiffxError(f"shapes.read: expected a square (H, W, 3) image, got shape {img.shape}")
    s = img.shape[0]
    v = img - np.array(BACKGROUND, float)  # (H, W, 3)

    # 1. Colour: each pixel is bg + alpha * (colour - bg); pick the colour whose line explains
    #    all pixels with the least residual, which is immune to the dimming of anti-aliased edges.
    best = None
    for name in colors:
        u = np.array(PALETTE[name], float) - np.array(BACKGROUND, float)
        a = np.clip(v @ u / (u @ u), 0.0, 1.0)  # (H, W)
        residual = ((v - a[..., None] * u) ** 2).sum()
        if best is None or residual < best[0]:
            best = (residual, name, a)
    _, color, alpha = best
    alpha = _main_blob(np.where(alpha < _ALPHA_FLOOR, 0.0, alpha))
    area = alpha.sum()
    if area < 1.0:
        return {"shape": None, "color": None, "size": None, "position": None}

    # 2. Shape: moments of the coverage map, matched to the closed-form unit-shape signatures.
    #    Sampling coverage at pixel centres adds a uniform [-1/2, 1/2] offset per axis, whose
    #    variance (1/12) is taken back out so that small shapes match the continuous formulas.
    c = np.arange(s) + 0.5
    mx, my = (alpha * c[None, :]).sum() / area, (alpha * c[:, None]).sum() / area
    dx, dy = c[None, :] - mx, c[:, None] - my
    m_xx = (alpha * dx**2).sum() / area - 1 / 12
    m_yy = (alpha * dy**2).sum() / area - 1 / 12
    m_yyy = (alpha * dy**3).sum() / area
    m_xxyy = (alpha * dx**2 * dy**2).sum() / area - (m_xx + m_yy) / 12 - 1 / 144
    m_xx, m_yy = max(m_xx, 1e-6), max(m_yy, 1e-6)
    skew, q = m_yyy / m_yy**1.5, m_xxyy / (m_xx * m_yy)
    shape = min(shapes, key=lambda n: (skew - _SIGNATURE[n][0]) ** 2 + (q - _SIGNATURE[n][1]) ** 2)

    # 3. Size: the box half-width implied by the area of that shape, nearest in log scale.
    r = np.sqrt(area / _AREA[shape])  # pixels
    size = min(SIZES, key=lambda n: abs(np.log(r / (SIZES[n] * s))))

    # 4. Position: undo the shape's centroid offset to get the anchor, then the nearest anchor.
    ax, ay = mx / s, (my - _CENTROID_V[shape] * r) / s
    position = min(POSITIONS, key=lambda n: (ax - POSITIONS[n][0]) ** 2 + (ay - POSITIONS[n][1]) ** 2)
    return {"shape": shape, "color": color, "size": size, "position": position}


def caption(attrs: dict) -> str:
    """'a small red circle at the top left' for the given attributes."""
    pos = attrs["position"]
    return f"a {attrs['size']} {attrs['color']} {attrs['shape']} {_PHRASES[pos]} {pos}"


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
