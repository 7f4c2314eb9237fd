"""Sample-quality metrics (diffx/metrics/): the Frechet distance and KID as math, the pinned TF-Inception
file (its sha256, that it is TorchScript, its features on a fixed input), and ``diffx eval metrics=[...]``
end to end on a tiny digits model."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import compose_config

from diffx.errors import DiffxError
from diffx.evaluate import evaluate
from diffx.metrics import classifier, fid, inception, suite
from diffx.train import train


def _features(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    """n draws (seeded by ``seed``) of one fixed correlated Gaussian in d dimensions."""
    fixed = np.random.default_rng(1000 + d)
    mix, mean = fixed.normal(size=(d, d)), fixed.normal(size=d)  # non-diagonal covariance
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + mean


def test_fid_of_a_set_against_itself_is_zero():
    a = _features(400)
    assert abs(fid.fd(a, a)) < 1e-8
    scale = np.trace(np.cov(a[:5], rowvar=False))
    assert abs(fid.fd(a[:5], a[:5])) < 1e-7 * scale  # singular covariance (N < D + 1): round-off in its null space


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2, v1, v2 = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_grows_monotonically_with_added_noise():
    a, b = _features(2000, seed=0), _features(2000, seed=1)
    noise = np.random.default_rng(2).normal(size=b.shape)
    values = [fid.fd(a, b + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)]
    assert values[0] < 0.01 * np.trace(np.cov(a, rowvar=False)) and all(x < y for x, y in zip(values, values[1:])), values


def _mmd2_direct(x, y):
    """The unbiased MMD^2 written as the double sums of Gretton et al. 2012, eq. 3."""
    k = lambda u, v: (float(np.dot(u, v)) / len(u) + 1.0) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_estimator_equals_the_direct_double_sum():
    x, y = _features(12, seed=3), _features(9, seed=4) + 0.5
    assert fid.mmd2_unbiased(x, y) == pytest.approx(_mmd2_direct(x, y), rel=1e-10)
    mean, std = fid.kid(x, y, subsets=1, subset_size=9)  # one subset of 9 from each
    assert np.isfinite(mean) and std == 0.0


def test_kid_is_unbiased_where_fid_is_not():
    """Two small samples of one distribution: KID averages to 0 (unbiased), FID stays clearly positive."""
    kids = [fid.mmd2_unbiased(_features(20, seed=2 * i, d=4) / 4, _features(20, seed=2 * i + 1, d=4) / 4)
            for i in range(300)]
    assert abs(np.mean(kids)) < 3 * np.std(kids) / np.sqrt(len(kids))
    assert np.mean([fid.fd(_features(20, seed=2 * i, d=4), _features(20, seed=2 * i + 1, d=4)) for i in range(20)]) > 0.5


def test_the_inception_file_is_the_pinned_torchscript_archive():
    path = inception.path()
    assert inception.sha256(path) == inception.SHA256
    inception.check_torchscript(path)  # raises if not


def test_a_pickle_that_imports_python_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("m/version", "3\n")
        z.writestr("m/code/__torch__/m.py", "")
        z.writestr("m/data.pkl", pickle.dumps(Evil()))
    with pytest.raises(DiffxError, match="builtins print"):
        inception.check_torchscript(bad)
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DiffxError, match="not a TorchScript archive"):
        inception.check_torchscript(tmp_path / "plain.pt")


# The features of the fixed input below, computed once with this file (torch 2.13 CPU, float32).
EXPECTED = {"sum": 1166.0614, "first": [0.28220484, 0.26461259, 0.62743413, 0.04668269]}


def _fixed_images() -> np.ndarray:
    return (np.arange(2 * 16 * 16 * 3).reshape(2, 16, 16, 3) % 251).astype(np.uint8)


def test_inception_features_of_a_fixed_input():
    feats = inception.Inception()(_fixed_images())
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    assert float(feats.sum()) == pytest.approx(EXPECTED["sum"], rel=1e-4)
    np.testing.assert_allclose(feats[0, :4], EXPECTED["first"], rtol=1e-4, atol=1e-5)
    grey = inception.Inception()(_fixed_images()[..., :1])  # one channel is repeated to three
    np.testing.assert_allclose(grey, inception.Inception()(np.repeat(_fixed_images()[..., :1], 3, -1)))


def test_resize_maps_a_constant_image_to_itself_and_keeps_tf1_alignment():
    x = torch.full((1, 3, 8, 8), 7.0)
    assert torch.allclose(inception.resize(x, 20), torch.full((1, 3, 20, 20), 7.0))
    ramp = torch.arange(4.0).repeat(1, 1, 4, 1)  # (1, 1, 4, 4), columns 0..3
    out = inception.resize(ramp, 8)[0, 0, 0]
    assert torch.allclose(out, torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))  # TF1: x_in = i * 4 / 8, clamped


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cfg = compose_config("train", ["data=digits", "model=mmdit", "model.width=16", "model.depth=1", "model.heads=2",
                                   "model.patch_size=4", "train.steps=2", "train.batch_size=8", "train.warmup=0",
                                   "train.log_every=1", "train.save_every=2", f"run_dir={root / 'run'}"])
    return root, train(cfg) / "model.safetensors"


class PixelFeatures:
    """A stand-in for Inception with its interface: 48 pooled pixel values per image (fast)."""

    id, dim = "pixels-test", 48

    def __init__(self, device=None):
        pass

    def __call__(self, images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1).numpy()


@pytest.mark.parametrize("network", ["stand-in", pytest.param("inception", marks=pytest.mark.slow)])
def test_eval_metrics_write_json_with_sample_counts(digits_run, monkeypatch, network):
    root, ckpt = digits_run
    root = root / network
    monkeypatch.setitem(classifier.RECIPE, "epochs", 1)  # the judge's quality is not under test here
    if network == "stand-in":
        monkeypatch.setattr(suite, "Inception", PixelFeatures)
    cfg = compose_config("eval", [f"ckpt={ckpt}", "metrics=[fid,kid,class_accuracy,fd_classifier]", "cfg=[1,2]",
                                  "quality.samples=4", "quality.reference_images=5", "steps=2", "sampler=euler",
                                  "grid=uniform", f"quality.cache_dir={root / 'cache'}", f"out={root / 'eval'}"])
    report = evaluate(cfg)
    assert report["results"] == [] and report["metrics"] == ["fid", "kid", "class_accuracy", "fd_classifier"]
    written = json.loads((root / "eval" / "eval.json").read_text())
    assert [r["cfg"] for r in written["quality"]] == [1.0, 2.0]
    for row in written["quality"]:
        assert row["n"] == 4 and row["reference_n"] == 5 and row["kid_subset_size"] == 4
        assert row["fid"] > 0 and np.isfinite(row["kid"]) and 0 <= row["class_accuracy"] <= 1
        assert set(row["per_class"]) <= set("0123456789") and row["fd_classifier"] > 0
    assert (root / "eval" / "eval_samples_cfg1.png").is_file() and (root / "eval" / "eval_samples_cfg2.png").is_file()
    # the reference features (Inception, classifier) and the classifier's weights are cached on disk
    cached = sorted(p.name for p in (root / "cache").rglob("*.safetensors"))
    assert len(cached) == 3  # Inception reference, classifier reference, classifier weights


def test_unknown_metric_is_a_user_error(digits_run):
    root, ckpt = digits_run
    with pytest.raises(DiffxError, match="unknown 'fud'"):
        evaluate(compose_config("eval", [f"ckpt={ckpt}", "metrics=[fid,fud]", f"out={root / 'x'}"]))


def test_prompt_accuracy_still_needs_shapes(digits_run):
    root, ckpt = digits_run
    with pytest.raises(DiffxError, match="data=shapes only"):
        evaluate(compose_config("eval", [f"ckpt={ckpt}", f"out={root / 'y'}"]))
