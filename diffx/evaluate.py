"""``diffx eval``: how well a checkpoint trained on ``data=shapes`` draws what it is told.

For each split and guidance scale, one image per target (a fixed seeded subset of the split's
attribute combinations, the same for every checkpoint of the same data) is generated and read back
with ``diffx.shapes.examine`` -- the render rules run backwards, no learned judge -- and scored per
attribute and by exact match; an image whose blob fits no shape, or that holds a second object,
is not a match. A text checkpoint is told all four attributes and scored on all four; a label
checkpoint is told only its class (shape and colour), so only those are scored.

Splits (``diffx.holdout``): ``heldout`` targets are combinations training never showed
(``data.holdout``), ``seen`` ones it did, ``all`` the whole grid; ``auto`` scores heldout and seen
for a checkpoint trained with a hold-out, else all. Prompts are phrased by ``prompts=``:
``template`` (the training grammar), or ``paraphrase`` (templates and synonyms held out of training,
``diffx.captions``). Results go to a rich table and to ``eval.json`` beside the checkpoint.

``metrics=[...]`` chooses what is measured: ``prompt_accuracy`` (the above, the default; with the exact
match per class too) and the sample-quality metrics of ``diffx.metrics.suite`` -- ``fid``, ``kid``
(TF-Inception, against cached features of the training data), ``class_accuracy`` (per class too) and
``fd_classifier`` (a small CNN trained on the labelled training data: for data=digits, the digit
classifier) -- over ``quality.samples`` images per guidance scale, in ``eval.json``'s ``quality``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.table import Table

from diffx import captions, checkpoint, holdout, precision
from diffx import shapes as shape_rules
from diffx.atomic import atomic_write
from diffx.errors import DiffxError
from diffx.generate import Request, generate, guidance_options, resolve_device, sampling_plan
from diffx.images import grid, save_png
from diffx.metrics import suite

ATTRIBUTES = holdout.ATTRIBUTES


def evaluate(cfg: DictConfig) -> dict:
    """Generate, read back and score; returns the report that is also written as JSON."""
    if cfg.ckpt is None:
        raise DiffxError("ckpt is required: diffx eval ckpt=runs/<run>/model.safetensors")
    device = resolve_device(cfg.device)
    precision.check(cfg.precision)
    names = _metric_names(cfg.metrics)
    sample_metrics = [m for m in names if m != PROMPT_ACCURACY]
    parts, ckpt = checkpoint.load(cfg.ckpt, device)
    parts = precision.apply(parts, cfg.precision, device)
    data = ckpt.parts.get("data", {})
    scored = PROMPT_ACCURACY in names
    shapes, colors = _vocabulary(data, cfg.ckpt) if scored else ((), ())
    splits = _splits(str(cfg.split), data, shapes, colors) if scored else []
    scales = [float(s) for s in cfg.cfg] if isinstance(cfg.cfg, (list, ListConfig)) else [float(cfg.cfg)]
    plan = sampling_plan(cfg, parts.objective.schedule, ckpt.sampling)

    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent
    outputs = [out / "eval.json"] + [out / _grid_name(sp, s) for sp in splits for s in scales if cfg.save_grid]
    outputs += [out / _grid_name("samples", s) for s in scales if cfg.save_grid and sample_metrics]
    clash = [p for p in outputs if p.exists()]
    if clash and not cfg.overwrite:
        raise DiffxError(f"{clash[0]} already exists; choose another out= or pass overwrite=true")
    rows, prompts, attributes = [], {}, ()
    for split in splits:
        pool = holdout.split(split, data.get("holdout"), shapes, colors, int(data.get("seed", 0)))
        targets = draw(pool, cfg.captions, cfg.seed)
        texts = captions.captions(targets, str(cfg.prompts), cfg.seed)
        attributes, inputs = _requests(parts.condition, targets, texts)
        prompts[split] = [str(x) for x in inputs]
        notes = parts.condition.notes(inputs, ckpt.spec.vocabulary)
        if notes:  # e.g. paraphrases to a text encoder that knows only the training captions' words
            Console().print(f"warning: {len(notes)} of the {len(inputs)} {split} prompts cannot be read as written, "
                            f"e.g. {notes[0]}", soft_wrap=True, markup=False)
        seeds = [cfg.seed + i for i in range(len(targets))]
        for scale in scales:
            images, _ = generate(parts, plan, Request(seeds, inputs, None, scale, **guidance_options(cfg)), cfg.batch_size,
                                 device)
            rows.append({"split": split, "cfg": scale, **score(images, targets, attributes, shapes, colors)})
            if cfg.save_grid:
                save_png(out / _grid_name(split, scale), grid(images, upscale=max(1, 64 // ckpt.spec.image_size)))
    report = {
        "ckpt": str(cfg.ckpt), "step": ckpt.step, "sampler": plan.name, "steps": plan.steps, "seed": cfg.seed,
        "attributes": list(attributes), "splits": splits, "prompt_style": str(cfg.prompts), "prompts": prompts,
        "guidance": guidance_options(cfg),
        "results": rows,
        "metrics": names,
        # FID, KID, class accuracy ...: one row per guidance scale over cfg.quality.samples images
        "quality": suite.evaluate(sample_metrics, parts, plan, data, lambda: instantiate(data), scales,
                                  suite.Options(**cfg.quality, seed=cfg.seed, batch_size=cfg.batch_size), device,
                                  guidance_options(cfg), on_images=_grid_saver(cfg, out, ckpt.spec.image_size))
                   if sample_metrics else [],
    }
    path = out / "eval.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    tables = ([_table(report)] if rows else []) + ([quality_table(report["quality"], _title(report))]
                                                  if report["quality"] else [])
    Console().print(*tables, f"\nwrote {path}")
    return report


PROMPT_ACCURACY = "prompt_accuracy"  # the shapes read-back of this module; the others are diffx.metrics.suite's


def _metric_names(metrics) -> list[str]:
    names = [str(m) for m in metrics] if isinstance(metrics, (list, ListConfig)) else [str(metrics)]
    known = [PROMPT_ACCURACY, *suite.METRICS]
    if unknown := [m for m in names if m not in known]:
        raise DiffxError(f"metrics: unknown {unknown[0]!r}; expected a list of {', '.join(known)}")
    if not names:
        raise DiffxError(f"metrics=[]: expected at least one of {', '.join(known)}")
    return names


def _grid_saver(cfg, out: Path, size: int):
    """With save_grid: the first 64 images each quality row was measured on, as eval_samples_cfg<scale>.png."""
    if not cfg.save_grid:
        return None
    return lambda scale, images: save_png(out / _grid_name("samples", scale), grid(images[:64], upscale=max(1, 64 // size)))


def _title(report: dict) -> str:
    return f"{Path(report['ckpt']).name}, step {report['step']}, {report['sampler']} {report['steps']} steps"


def quality_table(rows: list[dict], title: str) -> Table:
    """FID, KID and the classifier's scores, each row with its sample count (FID at small N is
    biased upward: compare FIDs only at equal N, and read KID beside it)."""
    table = Table(title=f"sample quality: {title}")
    columns = [("cfg", lambda r: f"{r['cfg']:g}"), ("samples", lambda r: str(r["n"])),
               ("reference", lambda r: str(r.get("reference_n", "-"))),
               ("FID", lambda r: f"{r['fid']:.2f}" if "fid" in r else "-"),
               ("KID x 1e3", lambda r: f"{1e3 * r['kid']:.2f} +- {1e3 * r['kid_std']:.2f}" if "kid" in r else "-"),
               ("class accuracy", lambda r: f"{100 * r['class_accuracy']:.1f}%" if "class_accuracy" in r else "-"),
               ("worst class", lambda r: _worst(r.get("per_class"))),
               ("FD (classifier)", lambda r: f"{r['fd_classifier']:.3f}" if "fd_classifier" in r else "-")]
    shown = [(name, cell) for name, cell in columns if any(cell(r) != "-" for r in rows)]
    for name, _ in shown:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*(cell(row) for _, cell in shown))
    return table


def _worst(per_class: dict | None) -> str:
    if not per_class:
        return "-"
    name = min(per_class, key=per_class.get)
    return f"{name}: {100 * per_class[name]:.0f}%"


def draw(pool: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` attribute sets drawn without replacement from ``pool`` by ``seed``: a fixed evaluation
    set, in a stable order."""
    if n < 1:
        raise DiffxError(f"captions={n}: expected at least 1")
    return random.Random(seed).sample(pool, min(n, len(pool)))


def score(images: np.ndarray, targets: list[dict], attributes=ATTRIBUTES, shapes=shape_rules.SHAPES,
          colors=shape_rules.COLORS) -> dict:
    """Read each (H, W, 3) uint8 image back and compare it with its target attributes: the fraction
    right per attribute, the fraction with every scored attribute right and exactly one object
    (exact match), and the fraction malformed (a blob that fits no shape, or not one object)."""
    found = [shape_rules.examine(img, shapes, colors) for img in images]
    right = np.array([[r[a] == t[a] for a in attributes] for r, t in zip(found, targets)])  # (N, A)
    one = np.array([r["objects"] == 1 for r in found])
    malformed = np.array([r["shape"] is None or r["objects"] != 1 for r in found])
    exact = right.all(axis=1) & one
    classes = [f"{t['color']} {t['shape']}" for t in targets]  # a label checkpoint's class names
    return {
        "per_class": {c: float(exact[[k == c for k in classes]].mean()) for c in sorted(set(classes))},
        "n": len(targets),
        "accuracy": {a: float(right[:, k].mean()) for k, a in enumerate(attributes)},
        "exact": float(exact.mean()),
        "malformed": float(malformed.mean()),
        "reads": [{k: r[k] for k in (*ATTRIBUTES, "objects")} for r in found],
    }


def _splits(split: str, data: dict, shapes, colors) -> list[str]:
    if split != "auto":
        holdout.split(split, data.get("holdout"), shapes, colors, int(data.get("seed", 0)))  # checks the name
        return [split]
    return ["heldout", "seen"] if holdout.held_out(data.get("holdout"), shapes, colors, int(data.get("seed", 0))) \
        else ["all"]


def _grid_name(split: str, scale: float) -> str:
    return f"eval_{split}_cfg{scale:g}.png"


def _vocabulary(data: dict, ckpt) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The shapes and colours the checkpoint's data drew from: the only candidates when reading."""
    if data.get("_target_") != "diffx.data.shapes":
        raise DiffxError(f"{ckpt} was trained on {data.get('_target_')!r}; diffx eval scores models trained on "
                         "data=shapes only (it reads the shapes back from the pixels); for other data choose "
                         "metrics=[fid,kid] or, with class labels, metrics=[class_accuracy,fd_classifier]")
    return shape_rules.check(data.get("shapes", shape_rules.SHAPES), data.get("colors", shape_rules.COLORS))


# What a condition source can be told of a shapes image (``Source.tells``) -> the attributes scored.
_SCORED = {"caption": ATTRIBUTES, "class": ("shape", "color")}


def _requests(condition, targets: list[dict], texts: list[str]) -> tuple[tuple[str, ...], list]:
    """What the model is told per target, and so which attributes are scored: a caption (``texts``)
    tells all four, a class label (a colour and a shape) two."""
    inputs = [condition.input_for(text, f"{t['color']} {t['shape']}") for t, text in zip(targets, texts)]
    return _SCORED[condition.tells], inputs


def _table(report: dict) -> Table:
    attributes = report["attributes"]
    first = report["results"][0]
    table = Table(title=f"prompt adherence: {Path(report['ckpt']).name}, step {report['step']}, "
                        f"{report['sampler']} {report['steps']} steps, {report['prompt_style']} prompts, "
                        f"{first['n']} per split")
    for column in ("split", "cfg", *attributes, "exact match", "malformed"):
        table.add_column(column, justify="right")
    for row in report["results"]:
        table.add_row(row["split"], f"{row['cfg']:g}", *(f"{100 * row['accuracy'][a]:.1f}%" for a in attributes),
                      f"{100 * row['exact']:.1f}%", f"{100 * row['malformed']:.1f}%")
    return table
