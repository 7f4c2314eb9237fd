"""``diffx report`` with sample-quality scores: eval.json's ``quality`` rows (FID, KID, class accuracy,
FD in the classifier's space, each with its sample count) and ``train.eval_every``'s ``eval/<name>`` log
rows become columns of the table and report.csv, and curves in report_<metric>.png."""

import csv
import json

import yaml
from PIL import Image

from conftest import compose_config


def _job(root, name: str, lr: str, log_rows: list[dict], evaluation: dict | None = None):
    job = root / name
    (job / ".hydra" / "20260101-000000-x").mkdir(parents=True)
    (job / ".hydra" / "20260101-000000-x" / "overrides.yaml").write_text(yaml.safe_dump([f"train.lr={lr}", "data=digits"]))
    (job / "log.jsonl").write_text("".join(json.dumps({**r, "time": 100.0 + r["step"]}) + "\n" for r in log_rows))
    if evaluation is not None:
        (job / "eval.json").write_text(json.dumps(evaluation))


QUALITY = {"quality": [
    {"cfg": 1.0, "n": 2000, "fid": 12.5, "kid": 0.0041, "kid_std": 0.0003, "kid_subset_size": 1000, "reference_n": 1797,
     "class_accuracy": 0.975, "per_class": {"0": 1.0}, "fd_classifier": 0.05},
    {"cfg": 3.0, "n": 2000, "fid": 15.0, "kid": 0.0062, "kid_std": 0.0004, "kid_subset_size": 1000, "reference_n": 1797,
     "class_accuracy": 1.0, "per_class": {"0": 1.0}, "fd_classifier": 0.21}]}
TRAIN_EVALS = [{"step": 10, "loss": 0.5}, {"step": 10, "eval/n": 256, "eval/reference_n": 1000, "eval/kid": 0.02,
                                          "eval/kid_std": 0.001, "eval/class_accuracy": 0.6},
               {"step": 20, "loss": 0.4}, {"step": 20, "eval/n": 256, "eval/reference_n": 1000, "eval/kid": 0.01,
                                          "eval/kid_std": 0.001, "eval/class_accuracy": 0.9}]


def test_report_shows_quality_scores_with_their_sample_counts(tmp_path, capsys, monkeypatch):
    from diffx.report import report

    monkeypatch.setenv("COLUMNS", "400")  # rich fits the table to the terminal: wide enough for every header

    _job(tmp_path, "0", "1e-3", TRAIN_EVALS, QUALITY)
    _job(tmp_path, "1", "3e-4", [{"step": 10, "loss": 0.6}, {"step": 20, "loss": 0.45}])
    rows = report(compose_config("report", [f"dir={tmp_path}"]))

    first, second = rows
    assert first["fid@cfg1"] == 12.5 and first["fid@cfg3"] == 15.0 and first["kid@cfg3"] == 0.0062
    assert first["n@cfg1"] == 2000 and first["reference_n@cfg1"] == 1797 and first["kid_std@cfg1"] == 0.0003
    assert first["class_accuracy@cfg1"] == 0.975 and first["fd_classifier@cfg3"] == 0.21
    # train.eval_every: the last evaluation's scores and step, and nothing from a metric it did not log
    assert first["eval_step"] == 20 and first["class_accuracy@train"] == 0.9 and first["kid@train"] == 0.01
    assert first["n@train"] == 256 and "fid@train" not in first
    assert "fid@cfg1" not in second and "eval_step" not in second

    table = capsys.readouterr().out
    for text in ("FID@cfg1", "12.50", "samples@cfg1", "2000", "KID x 1e3@cfg3", "6.20 +- 0.40", "97.5%",
                 "class acc.@train", "90.0%", "samples@train (step 20)", "0.050"):
        assert text in table, text

    with open(tmp_path / "report.csv") as f:
        columns = next(csv.reader(f))
    assert {"fid@cfg1", "n@cfg1", "reference_n@cfg1", "kid_std@cfg3", "class_accuracy@train"} <= set(columns)
    # one curve file per metric logged during training, and none for those no run logged
    assert Image.open(tmp_path / "report_class_accuracy.png").size[0] > 0
    assert (tmp_path / "report_kid.png").is_file() and not (tmp_path / "report_fid.png").exists()


def test_report_without_quality_scores_keeps_its_split_columns(tmp_path, capsys, monkeypatch):
    from diffx.report import report

    monkeypatch.setenv("COLUMNS", "400")

    _job(tmp_path, "0", "1e-3", [{"step": 10, "loss": 0.5}], {"results": [
        {"split": "all", "cfg": 3.0, "n": 8, "exact": 0.75, "accuracy": {"shape": 1.0}}], "quality": []})
    _job(tmp_path, "1", "3e-4", [{"step": 10, "loss": 0.5}], {"results": [  # a hold-out run: both splits kept
        {"split": "heldout", "cfg": 3.0, "n": 8, "exact": 0.5, "accuracy": {"shape": 1.0}},
        {"split": "seen", "cfg": 3.0, "n": 8, "exact": 1.0, "accuracy": {"shape": 1.0}}]})
    rows = report(compose_config("report", [f"dir={tmp_path}"]))
    assert rows[0]["exact@cfg3"] == 0.75 and not any(k.startswith(("fid", "n@", "eval_step")) for k in rows[0])
    assert rows[1]["exact@heldout-cfg3"] == 0.5 and rows[1]["exact@seen-cfg3"] == 1.0
    out = capsys.readouterr().out
    assert "exact@cfg3" in out and "75.0%" in out and "FID" not in out and "samples" not in out
    assert not list(tmp_path.glob("report_*.png"))
