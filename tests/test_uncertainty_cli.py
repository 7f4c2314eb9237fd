"""``diffx fit-laplace`` then ``diffx sample uncertainty.enabled=true`` through the installed command, on the
session's tiny trained checkpoint (conftest's ``tiny_run``); the MC reference path and the sidecar's
refusal of another model file in-process."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from conftest import compose_config
from test_cli import diffx

from diffx import checkpoint
from diffx.errors import DiffxError
from diffx.fit_laplace import fit_laplace
from diffx.sample import sample


@pytest.fixture(scope="module")
def fitted(tiny_run, tmp_path_factory):
    """A copy of the tiny class-conditional UNet and its Laplace sidecar."""
    cwd = tmp_path_factory.mktemp("uncertainty")
    ckpt = cwd / "model.safetensors"
    shutil.copy(tiny_run / "model.safetensors", ckpt)
    fit_laplace(compose_config("fit_laplace", [f"ckpt={ckpt}", "pairs=64", "batch_size=16",
                                               f"+data.cache_dir={tiny_run.parent / 'cache'}"]))
    return cwd, ckpt


def _check_outputs(out, size: int):
    lines = [json.loads(line) for line in (out / "uncertainty.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in lines] == [0, 1, 2, 3] and all(r["score"] > 0 for r in lines)
    dropped = [r["seed"] for r in lines if not r["kept"]]
    assert dropped == [max(lines, key=lambda r: r["score"])["seed"]]  # the most uncertain 25% of 4
    assert sorted(p.name for p in out.glob("seed*.png")) == [f"seed{s:06d}.png" for s in range(4) if s not in dropped]
    maps = sorted((out / "uncertainty").glob("seed*.png"))
    assert len(maps) == 4 and Image.open(maps[0]).size == (size, size)
    scale = {(Image.open(m).text["log10_var_min"], Image.open(m).text["log10_var_max"]) for m in maps}
    assert len(scale) == 1  # one colour scale for the whole run
    assert (out / "uncertainty_grid.png").is_file()


def test_sample_writes_variance_maps_scores_and_filters(fitted):
    cwd, ckpt = fitted
    sample(compose_config("sample", [f"ckpt={ckpt}", "n=4", "steps=3", "sampler=ddim", "cfg=2", f"out={cwd / 'out'}",
                                     "uncertainty.enabled=true", "uncertainty.filter=0.25"]))
    _check_outputs(cwd / "out", 8)


@pytest.mark.slow
def test_fit_laplace_then_sample_through_the_command(tiny_run, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(tiny_run / "model.safetensors", ckpt)
    proc = diffx("fit-laplace", f"ckpt={ckpt}", "pairs=32", "batch_size=16", "structure=diag",
                 f"+data.cache_dir={tiny_run.parent / 'cache'}", cwd=tmp_path)
    assert "structure=diag: prior precision" in proc.stdout and (tmp_path / "laplace.safetensors").is_file()
    diffx("sample", f"ckpt={ckpt}", "n=4", "steps=3", "sampler=euler", "out=out", "uncertainty.enabled=true",
          "uncertainty.filter=0.25", cwd=tmp_path)
    _check_outputs(tmp_path / "out", 8)


def test_the_monte_carlo_reference_writes_the_same_outputs(fitted):
    cwd, ckpt = fitted
    sample(compose_config("sample", [f"ckpt={ckpt}", "n=4", "steps=3", "sampler=dpmpp", "cfg=2", f"out={cwd / 'mc'}",
                                     "uncertainty.enabled=true", "uncertainty.method=mc", "uncertainty.samples=4",
                                     "uncertainty.filter=0.25"]))
    _check_outputs(cwd / "mc", 8)


def test_a_sidecar_of_another_model_file_is_refused_in_one_line(fitted, tmp_path):
    cwd, ckpt = fitted
    c = checkpoint.read(ckpt)
    c.weights = {k: v + 1e-3 if k.endswith("out.2.bias") else v for k, v in c.weights.items()}  # a retrained head
    other = tmp_path / "model.safetensors"
    checkpoint.save(other, c.weights, c.parts, c.spec, c.step)
    with pytest.raises(DiffxError, match="fitted to another model file") as e:
        sample(compose_config("sample", [f"ckpt={other}", "n=1", "steps=2", "sampler=ddim", f"out={tmp_path / 'o'}",
                                         "uncertainty.enabled=true", f"uncertainty.laplace={cwd / 'laplace.safetensors'}"]))
    assert "\n" not in str(e.value) and f"diffx fit-laplace ckpt={other}" in str(e.value)


@pytest.mark.parametrize("overrides, expect", [
    ([], "ckpt is required"),
    (["ckpt=CKPT", "structure=full"], "structure=full"),
])
def test_fit_laplace_bad_input_is_one_line(fitted, overrides, expect):
    _, ckpt = fitted
    with pytest.raises(DiffxError, match=expect):
        fit_laplace(compose_config("fit_laplace", [o.replace("CKPT", str(ckpt)) for o in overrides]))


@pytest.mark.parametrize("overrides, expect", [
    (["uncertainty.method=exact"], "uncertainty.method=exact"),
    (["uncertainty.filter=1.5"], "uncertainty.filter=1.5"),
    (["sampler=ddpm"], "deterministic"),
])
def test_sample_uncertainty_bad_input_is_one_line(fitted, tmp_path, overrides, expect):
    _, ckpt = fitted
    with pytest.raises(DiffxError, match=expect):
        sample(compose_config("sample", [f"ckpt={ckpt}", "n=1", "steps=2", f"out={tmp_path}", "uncertainty.enabled=true",
                                         *overrides]))


def test_a_text_conditioned_mmdit_fits_and_samples_with_uncertainty(tmp_path):
    """The other head (MMDiT's final linear, unpatchified) behind the text encoder's wrapper, guided."""
    from hydra.utils import instantiate

    from conftest import saved_random_model
    from diffx.build import DataSpec

    cfg = compose_config("train", ["model=mmdit", "model.width=16", "model.depth=1", "model.heads=2",
                                   "model.patch_size=4", "data.size=8", "data.n=16", f"data.cache_dir={tmp_path / 'c'}",
                                   "text_encoder=tiny", "text_encoder.width=16", "text_encoder.depth=1",
                                   "text_encoder.heads=2"])
    ckpt = tmp_path / "model.safetensors"
    parts = saved_random_model(cfg, DataSpec.of(instantiate(cfg.data)), ckpt, step=1)
    assert parts.model.head is parts.model.net.final.linear
    fit_laplace(compose_config("fit_laplace", [f"ckpt={ckpt}", "pairs=32", "batch_size=16", "structure=diag"]))
    sample(compose_config("sample", [f"ckpt={ckpt}", "n=4", "steps=3", "sampler=dpmpp", "cfg=3", f"out={tmp_path / 'o'}",
                                     "prompt=a red circle", "uncertainty.enabled=true", "uncertainty.filter=0.25"]))
    lines = [json.loads(line) for line in (tmp_path / "o" / "uncertainty.jsonl").read_text().splitlines()]
    # a random model may push every pixel of an image to the clip range, where the variance is 0 (exact)
    assert len(lines) == 4 and sum(not r["kept"] for r in lines) == 1
    assert all(r["score"] >= 0 for r in lines) and any(r["score"] > 0 for r in lines)
    assert len(list((tmp_path / "o").rglob("uncertainty/seed*.png"))) == 4
