"""``diffx report dir=runs/multirun-<id>``: the jobs of a sweep side by side.

Every run folder below ``dir`` (one with a ``log.jsonl``: the jobs of ``diffx train -m`` under any
launcher or sweeper, or separate runs) is one row: the overrides that set it apart from the other rows
(those common to all are printed once above the table), its steps, its last logged training loss, its
EMA model's loss on the fixed probe batch (``metrics.json``, diffx.monitor), the scores of ``diffx eval``
when an ``eval.json`` lies beside it (exact match; FID, KID, class accuracy, FD in the classifier's
space, each guidance scale with its sample count: FID at small N is biased, compare only at equal N),
the last ``train.eval_every`` scores of its log, and its training time. Written as a rich table,
``report.csv`` (every override and every score), ``report.png`` (the loss curves of all rows) and, when
runs evaluated during training, ``report_<metric>.png`` (that metric over the steps, one line per run).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from diffx import plots
from diffx.atomic import atomic_write
from diffx.errors import DiffxError

NUMBERS = ("steps", "final_loss", "probe_loss")  # the columns every row has, after the overrides
# diffx eval's sample-quality numbers (eval.json "quality", one row per guidance scale; diffx.metrics.suite),
# also logged as eval/<name> by train.eval_every; each comes with its sample count n.
QUALITY = ("fid", "kid", "class_accuracy", "fd_classifier")


def report(cfg: DictConfig) -> list[dict]:
    """Read the runs below ``cfg.dir``, print the table, write report.csv and report.png; returns the rows."""
    root = Path(cfg.dir).expanduser()
    if not root.is_dir():
        raise DiffxError(f"dir={cfg.dir}: no such folder; expected a sweep folder such as runs/multirun-<id>")
    runs = sorted({p.parent for p in root.rglob("log.jsonl")}, key=lambda p: _natural(p.relative_to(root)))
    if not runs:
        raise DiffxError(f"dir={cfg.dir}: no runs below it (no log.jsonl); expected the folder of a diffx train -m "
                         "sweep, such as runs/multirun-<id>")
    jobs = [_read(root, run) for run in runs]
    varying, common = _split(jobs)
    rows = [_row(job, varying) for job in jobs]
    if cfg.sort is not None:
        columns = list(rows[0])
        if cfg.sort not in columns:
            raise DiffxError(f"sort={cfg.sort}: not a column; expected one of {', '.join(columns)}")
        rows.sort(key=lambda r: (r[cfg.sort] is None, r[cfg.sort] if r[cfg.sort] is not None else 0))

    out = Path(cfg.out).expanduser() if cfg.out else root
    atomic_write(out / "report.csv", lambda tmp: Path(tmp).write_text(_csv(rows)))
    curves = {_label(job, varying): plots.loss_series(job["log"]) for job in jobs}
    plots.save_curves(out / "report.png", curves, f"training loss, {len(jobs)} runs under {root.name}")
    written = [out / "report.png"]
    for name in QUALITY:  # train.eval_every: each metric's curve, where any run logged it
        series = {_label(job, varying): plots.loss_series(job["log"], f"eval/{name}") for job in jobs}
        if any(series.values()):
            written.append(out / f"report_{name}.png")
            plots.save_curves(written[-1], series, f"{name} during training, {len(jobs)} runs under {root.name}",
                              ylabel=name, log_y=False)
    console = Console()
    if common:
        console.print("common to all: " + " ".join(f"{k}={v}" for k, v in common.items()))
    console.print(_table(rows, varying, root), f"\nwrote {out / 'report.csv'}, " + ", ".join(str(p) for p in written))
    return rows


def _read(root: Path, run: Path) -> dict:
    """One run's files: its overrides (of its latest attempt), log rows, metrics.json and eval.json."""
    attempts = sorted(run.glob(".hydra/*/overrides.yaml")) or sorted(run.glob(".hydra/overrides.yaml"))
    overrides = {}
    for item in (yaml.safe_load(attempts[-1].read_text()) or []) if attempts else []:
        key, _, value = str(item).partition("=")
        overrides[key] = value
    eval_path = run / "eval.json"
    try:
        evaluation = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    except ValueError:
        evaluation = {}
    return {"job": run.relative_to(root).as_posix() if run != root else run.name, "overrides": overrides,
            "log": plots.read_log(run / "log.jsonl"), "metrics": plots.read_metrics(run), "eval": evaluation}


def _split(jobs: list[dict]) -> tuple[list[str], dict]:
    """The override keys whose value differs between the jobs (absent counts as a value), in first-seen
    order, and the overrides that every job shares."""
    keys = list(dict.fromkeys(k for job in jobs for k in job["overrides"]))
    values = {k: {job["overrides"].get(k) for job in jobs} for k in keys}
    varying = [k for k in keys if len(values[k]) > 1]
    common = {k: jobs[0]["overrides"][k] for k in keys if len(values[k]) == 1}
    return varying, common


def _row(job: dict, varying: list[str]) -> dict:
    log, metrics = job["log"], job["metrics"]
    last = log[-1] if log else {}
    row = {"job": job["job"], **{k: job["overrides"].get(k) for k in varying},
           "steps": metrics.get("step", last.get("step")),
           "final_loss": metrics.get("final_loss", last.get("loss")),
           "probe_loss": metrics.get("probe_loss")}
    for result in job["eval"].get("results", []):  # diffx eval: one result per split and guidance scale
        split = result.get("split", "all")  # a hold-out run's heldout and seen rows each get their columns
        scale = f"cfg{result['cfg']:g}" if split == "all" else f"{split}-cfg{result['cfg']:g}"
        row[f"exact@{scale}"] = result.get("exact")
        row.update({f"{a}@{scale}": v for a, v in result.get("accuracy", {}).items()})
    for result in job["eval"].get("quality", []):  # diffx eval metrics=[fid,kid,...]: one per guidance scale
        row.update(_quality(result, f"@cfg{result['cfg']:g}"))
    evals = [r for r in log if any(f"eval/{name}" in r for name in QUALITY)]
    if evals:  # train.eval_every: its last scores, at their step
        row.update({"eval_step": evals[-1]["step"], **_quality({k[5:]: v for k, v in evals[-1].items()
                                                                 if k.startswith("eval/")}, "@train")})
    seconds = metrics.get("seconds")
    if seconds is None and len(log) > 1:  # a run without metrics.json: from its log's clock
        seconds = log[-1]["time"] - log[0]["time"]
    row["seconds"] = seconds
    row["overrides"] = " ".join(f"{k}={v}" for k, v in job["overrides"].items())
    return row


def _quality(result: dict, suffix: str) -> dict:
    """One quality row's numbers as columns ``<name><suffix>``, with its sample and reference counts."""
    columns = {f"{k}{suffix}": result[k] for k in (*QUALITY, "kid_std") if k in result}
    if columns:
        columns.update({f"{k}{suffix}": result.get(k) for k in ("n", "reference_n")})
    return columns


# Table cells of the score columns: (column prefix, header, cell from the row and the column's suffix).
_SCORES = (
    ("exact", "exact", lambda r, s: _fmt(r.get(f"exact{s}"), "{:.1%}")),
    ("n", "samples", lambda r, s: _fmt(r.get(f"n{s}"), "{}")),
    ("fid", "FID", lambda r, s: _fmt(r.get(f"fid{s}"), "{:.2f}")),
    ("kid", "KID x 1e3", lambda r, s: "-" if r.get(f"kid{s}") is None else
     f"{1e3 * r[f'kid{s}']:.2f} +- {1e3 * (r.get(f'kid_std{s}') or 0):.2f}"),
    ("class_accuracy", "class acc.", lambda r, s: _fmt(r.get(f"class_accuracy{s}"), "{:.1%}")),
    ("fd_classifier", "FD (classifier)", lambda r, s: _fmt(r.get(f"fd_classifier{s}"), "{:.3f}")),
)


def _score_columns(rows: list[dict]) -> list[tuple[str, callable]]:
    """The score columns some row has, by guidance scale (then train.eval_every's), as (header, cell)."""
    keys = list(dict.fromkeys(k for r in rows for k in r if "@" in k and r[k] is not None))
    suffixes = list(dict.fromkeys("@" + k.split("@", 1)[1] for k in keys))
    return [(f"{header}{suffix}" + (f" (step {_last_eval(rows)})" if suffix == "@train" and prefix == "n" else ""),
             lambda r, cell=cell, suffix=suffix: cell(r, suffix))
            for suffix in suffixes for prefix, header, cell in _SCORES if f"{prefix}{suffix}" in keys]


def _last_eval(rows: list[dict]) -> str:
    steps = {r.get("eval_step") for r in rows if r.get("eval_step") is not None}
    return str(steps.pop()) if len(steps) == 1 else "last"


def _table(rows: list[dict], varying: list[str], root: Path) -> Table:
    """Overrides, steps, losses, eval scores with their sample counts, time; the lowest probe loss in bold."""
    scores = _score_columns(rows)
    probes = [r["probe_loss"] for r in rows if r["probe_loss"] is not None]
    table = Table(title=f"{len(rows)} runs under {root}")
    table.add_column("job")
    for key in varying:
        table.add_column(key)
    for name in ("steps", "final loss", "probe loss", *(header for header, _ in scores), "time"):
        table.add_column(name, justify="right")
    for r in rows:
        best = bool(probes) and r["probe_loss"] == min(probes)
        table.add_row(r["job"], *(str(r[k]) if r[k] is not None else "-" for k in varying),
                      _fmt(r["steps"], "{}"), _fmt(r["final_loss"], "{:.4f}"), _fmt(r["probe_loss"], "{:.4f}"),
                      *(cell(r) for _, cell in scores), _duration(r["seconds"]),
                      style="bold" if best and len(rows) > 1 else None)
    return table


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _label(job: dict, varying: list[str]) -> str:
    return " ".join([job["job"] + ":", *(f"{k}={job['overrides'].get(k, '-')}" for k in varying)]).rstrip(":")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{minutes}m {s:02d}s"


def _natural(path: Path) -> list:
    """Sort key: numbers in a path by value, so job 10 comes after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]
