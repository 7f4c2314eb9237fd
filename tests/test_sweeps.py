"""Sweeps on real launchers and sweepers, through the installed ``diffx`` command, and ``diffx report``.

The joblib launcher runs the jobs in worker processes: they must share one sweep folder, return their
errors to the command, and the report must find every job. The Optuna sweeper minimises the number
the train job returns to Hydra: the final EMA loss on the probe batch, written to metrics.json.
"""

import csv
import json

import yaml
from PIL import Image

from conftest import TINY_TRAIN, compose_config
from test_cli import diffx


def _tiny(tmp_path):
    return [*TINY_TRAIN, f"data.cache_dir={tmp_path / 'cache'}", "out=runs"]


def _jobs(sweep):
    return sorted((p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: int(p.name))


def test_joblib_sweep_runs_four_jobs_in_one_folder_and_the_report_lists_them(tmp_path):
    diffx("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.lr=1e-4,3e-4", "seed=0,1",
          *_tiny(tmp_path), cwd=tmp_path)
    (sweep,) = (tmp_path / "runs").iterdir()  # one folder: the workers share the sweep's run id
    jobs = _jobs(sweep)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "model.safetensors").is_file() and json.loads((job / "metrics.json").read_text())["probe_loss"] > 0

    out = diffx("report", f"dir={sweep}", cwd=tmp_path).stdout
    assert "4 runs" in out and "train.lr" in out and "seed" in out and "probe loss" in out
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert {(r["train.lr"], r["seed"]) for r in rows} == {("0.0001", "0"), ("0.0001", "1"), ("0.0003", "0"),
                                                          ("0.0003", "1")}
    for row, job in zip(rows, jobs):
        assert float(row["probe_loss"]) == json.loads((job / "metrics.json").read_text())["probe_loss"]
    with Image.open(sweep / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_a_failed_job_in_a_worker_process_fails_the_command_with_its_line(tmp_path):
    """The jobs fail in the workers' checks (before any training): the first one's line, exit 1."""
    proc = diffx("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.lr=-1,-2",
                 *_tiny(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "diffx train: error: train.lr=-1: expected a number > 0"


def test_optuna_sweep_minimises_the_probe_loss_the_train_job_returns(tmp_path):
    diffx("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
          "hydra.sweeper.sampler.seed=0", "train.lr=tag(log,interval(1e-4,1e-2))", *_tiny(tmp_path), cwd=tmp_path)
    (sweep,) = (tmp_path / "runs").iterdir()
    losses = [json.loads((job / "metrics.json").read_text())["probe_loss"] for job in _jobs(sweep)]
    assert len(losses) == 3 and len(set(losses)) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(losses)


def test_report_reads_overrides_eval_scores_and_sorts(tmp_path):
    """Hand-made job folders: the overrides that differ become columns, the common ones do not; eval.json
    scores become columns; sort= orders the rows; numbers in job names sort by value."""
    from diffx.report import report

    for name, lr, probe in (("2", "1e-3", 0.2), ("10", "1e-4", 0.1), ("9", "3e-4", None)):
        job = tmp_path / name
        (job / ".hydra" / "20260101-000000-x").mkdir(parents=True)
        (job / ".hydra" / "20260101-000000-x" / "overrides.yaml").write_text(yaml.safe_dump([f"train.lr={lr}", "data.size=8"]))
        (job / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "time": 100.0 + s}) + "\n"
                                               for s in (1, 2, 3)) + '{"step": 4, "lo')  # a cut-off last line
        if probe is not None:
            (job / "metrics.json").write_text(json.dumps({"step": 3, "probe_loss": probe, "final_loss": 0.3,
                                                          "seconds": 12.0}))
    (tmp_path / "2" / "eval.json").write_text(json.dumps({"results": [
        {"cfg": 3.0, "n": 8, "exact": 0.75, "accuracy": {"shape": 1.0, "color": 0.75}}]}))

    rows = report(compose_config("report", [f"dir={tmp_path}"]))
    assert [r["job"] for r in rows] == ["2", "9", "10"]
    assert "train.lr" in rows[0] and "data.size" not in rows[0]
    assert rows[0]["exact@cfg3"] == 0.75 and rows[0]["color@cfg3"] == 0.75 and rows[1].get("exact@cfg3") is None
    assert rows[1]["final_loss"] == 1 / 3 and rows[1]["probe_loss"] is None and rows[1]["seconds"] == 2.0
    rows = report(compose_config("report", [f"dir={tmp_path}", "sort=probe_loss", f"out={tmp_path / 'out'}"]))
    assert [r["job"] for r in rows] == ["10", "2", "9"]  # a job without a probe loss last
    assert (tmp_path / "out" / "report.csv").is_file() and (tmp_path / "out" / "report.png").is_file()
