"""``scripts/bench_quality.py`` (time to quality): the table of CPU-minutes to each exact-match threshold,
its curve, the diffusers baseline's parameter matching, and a tiny end-to-end run (--smoke)."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name, points, params=1_000_000):
    return [{"run": name, "step": 100 * (k + 1), "cpu_s": 60.0 * m, "exact": e, "malformed": 0.0, "cfg": 3.0,
             "prompts": 128, "params": params, "params_total": params + 5} for k, (m, e) in enumerate(points)]


def test_table_gives_the_first_cpu_minute_at_each_threshold_and_the_ratio(bench):
    curves = {"diffx": _rows("diffx", [(1, 0.3), (2, 0.85), (3, 0.7), (4, 0.96)]),
              "diffusers": _rows("diffusers", [(4, 0.55), (8, 0.92), (12, 0.93)])}
    assert bench.first_reach(curves["diffx"], 0.8) == 2.0  # the first crossing, not a later one
    assert bench.first_reach(curves["diffusers"], 0.95) is None
    lines = bench.table(curves).splitlines()
    assert lines[2] == "| 50% | 2.0 | 4.0 | 2.0x |"
    assert lines[4] == "| 90% | 4.0 | 8.0 | 2.0x |"
    # not reached: the run's last CPU-minute is the bound, and the ratio is a lower bound
    assert lines[5] == "| 95% | 4.0 | not within 12.0 | >= 3.0x |"


def test_report_writes_the_table_and_the_curve(bench, tmp_path):
    for name, points in (("diffx", [(1, 0.5), (2, 0.97)]), ("diffusers", [(3, 0.2)])):
        (tmp_path / f"curve_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(name, points)))
    text = bench.report(tmp_path, tmp_path / "docs" / "curve.png")
    assert "| 95% | 2.0 | not within 3.0 | >= 1.5x |" in text
    # a further baseline (e.g. another --lr, its curve renamed) gets its own columns, diffx's still first
    (tmp_path / "curve_diffusers-lr1e-3.jsonl").write_text(json.dumps(_rows("diffusers", [(1, 0.96)])[0]) + "\n")
    text = bench.report(tmp_path, tmp_path / "docs" / "curve.png")
    assert text.splitlines()[0] == ("| exact match | diffx (CPU-min) | diffusers (CPU-min) | diffusers-lr1e-3 (CPU-min) "
                                    "| diffusers / diffx | diffusers-lr1e-3 / diffx |")
    assert "| 95% | 2.0 | not within 3.0 | 1.0 | >= 1.5x | 0.5x |" in text
    assert (tmp_path / "table.md").read_text().strip() == text
    assert Image.open(tmp_path / "docs" / "curve.png").size[0] > 0


def test_report_without_curves_says_what_to_run(bench, tmp_path):
    from diffx.errors import DiffxError

    with pytest.raises(DiffxError, match="run with --runs first"):
        bench.report(tmp_path, tmp_path / "curve.png")


@pytest.mark.slow  # importing diffusers alone takes 10-60 s on a shared CPU
def test_the_baseline_unet_is_sized_to_the_target_parameter_count(bench):
    for target in (1_000_000, 2_288_912):
        unet = bench.matched_unet(16, 3, 128, target)
        assert abs(bench._count(unet) - target) / target < 0.1
        assert unet.config.cross_attention_dim == 128 and unet.config.in_channels == 3


@pytest.mark.slow
def test_smoke_trains_and_scores_both_runs(bench, tmp_path):
    bench.main(["--smoke", "--runs", "diffx", "diffusers", "--out", str(tmp_path)])
    for name in ("diffx", "diffusers"):
        rows = [json.loads(line) for line in (tmp_path / f"curve_{name}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4] and rows[1]["cpu_s"] > rows[0]["cpu_s"] > 0
        assert rows[0]["prompts"] == 4 and 0 <= rows[0]["exact"] <= 1
    assert (tmp_path / "diffx_run" / "model.safetensors").is_file()
    assert (tmp_path / "time_to_quality.png").is_file() and (tmp_path / "table.md").is_file()
