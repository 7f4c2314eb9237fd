"""Loss curves as PNG files, drawn with Pillow (no plotting library): one run's ``loss.png`` at the end
of training, and every job of a sweep on one chart in ``diffx report``; and the readers of the files
they are drawn from, a run's ``log.jsonl`` and ``metrics.json``.

``curves(series)`` draws any number of (step, value) lines on shared axes, the y axis logarithmic when
the values span more than a decade (a diffusion loss falls fastest in its first hundred steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffx.atomic import atomic_write

# Tableau's ten colours, the usual cycle of plotting libraries.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
METRICS = "metrics.json"  # a finished run's final numbers (diffx.monitor.write_results)


def read_log(path: Path) -> list[dict]:
    """The rows of a run's ``log.jsonl``; a line cut short by a kill mid-write is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(run_dir: Path) -> dict:
    """A run's ``metrics.json``, or {} when it has none (a run stopped before its end)."""
    try:
        return json.loads((Path(run_dir) / METRICS).read_text())
    except (OSError, ValueError):
        return {}


def loss_series(rows: list[dict], key: str = "loss") -> list[tuple[float, float]]:
    """(step, value) pairs of ``key`` from log rows, finite values only."""
    return [(float(r["step"]), float(r[key])) for r in rows
            if key in r and "step" in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]


def save_curves(path: Path, series: dict[str, list[tuple[float, float]]], title: str, ylabel: str = "loss",
                xlabel: str = "step", log_y: bool | None = None) -> None:
    """Write ``curves(...)`` as a PNG, atomically."""
    image = curves(series, title, ylabel, xlabel=xlabel, log_y=log_y)
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def curves(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str = "loss",
           size: tuple[int, int] = (720, 420), xlabel: str = "step", log_y: bool | None = None) -> Image.Image:
    """One line per named series of (x, y) points on shared axes; a legend when there is more than one.
    ``log_y``: None chooses a log y axis when the values span more than a decade."""
    font = ImageFont.load_default(size=12)
    points = [p for s in series.values() for p in s]
    legend = len(series) > 1
    width, height = size[0] + (200 if legend else 0), size[1]
    left, right, top, bottom = 70, size[0] - 20, 40, height - 46  # the plot area, in pixels
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    _centred(draw, ((left + right) / 2, 6), title, font)
    if not points:
        draw.text((left, height // 2), "no data", fill="gray", font=font)
        return image

    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    log_y = bool(ys.min() > 0 and ys.max() / ys.min() > 10) if log_y is None else log_y and bool(ys.min() > 0)
    fy = np.log10 if log_y else (lambda v: np.asarray(v, dtype=float))
    x_lo, x_hi = _padded(xs.min(), xs.max())
    y_lo, y_hi = _padded(float(fy(ys.min())), float(fy(ys.max())))

    def to_px(x, y):  # data -> pixel coordinates (y up)
        px = left + (np.asarray(x, float) - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (fy(y) - y_lo) / (y_hi - y_lo) * (bottom - top)
        return px, py

    # axes, grid lines and tick labels
    for x in _ticks(x_lo, x_hi, whole=True):
        px, _ = to_px(x, ys.min())
        draw.line([(px, top), (px, bottom)], fill="#e8e8e8")
        _centred(draw, (px, bottom + 6), _fmt(x), font)
    y_ticks = _log_ticks(y_lo, y_hi) if log_y else _ticks(y_lo, y_hi)
    for y in y_ticks:
        py = bottom - ((math.log10(y) if log_y else y) - y_lo) / (y_hi - y_lo) * (bottom - top)
        draw.line([(left, py), (right, py)], fill="#e8e8e8")
        label = _fmt(y)
        draw.text((left - 6 - draw.textlength(label, font=font), py - 7), label, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    _centred(draw, ((left + right) / 2, height - 20), xlabel, font)
    draw.text((6, top - 16), ylabel + (" (log scale)" if log_y else ""), fill="black", font=font)

    # the lines, then the legend
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        px, py = to_px([p[0] for p in pts], [p[1] for p in pts])
        xy = list(zip(px.tolist(), py.tolist()))
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy[-1:] if len(xy) > 1 else xy:  # the last point marked: where each run ended
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        if legend:
            ly = top + 16 * k
            if ly > bottom - 12:
                draw.text((size[0] + 4, ly), f"... {len(series) - k} more", fill="black", font=font)
                break
            draw.line([(size[0], ly + 7), (size[0] + 18, ly + 7)], fill=color, width=3)
            draw.text((size[0] + 24, ly), _clip(name, draw, font, 170), fill="black", font=font)
    return image


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """The axis range: the data's, 4% wider on each side; a single value gets a unit-wide range."""
    if hi - lo < 1e-12:
        return lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    pad = 0.04 * (hi - lo)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 6, whole: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]; ``whole``: at least 1
    apart (steps)."""
    raw = max((hi - lo) / target, 1.0 if whole else 0.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log10 axis spanning [lo, hi] in log10 units: 1, 2 and 5 times each power of ten,
    thinned to the powers of ten alone when the span is wide."""
    mults = (1, 2, 5) if hi - lo < 3 else (1,)
    return [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mults
            if lo <= math.log10(m * 10.0 ** e) <= hi]


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}"
    return f"{v:.4g}"


def _centred(draw, xy, text: str, font) -> None:
    draw.text((xy[0] - draw.textlength(text, font=font) / 2, xy[1]), text, fill="black", font=font)


def _clip(text: str, draw, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
