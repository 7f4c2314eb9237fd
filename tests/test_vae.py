"""The KL autoencoder, its file (diffx/vae.py) and ``diffx train-vae``: shapes, the KL term, the latent
scale, a tiny run that resumes bit-exactly, and files that are refused with one line."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import compose_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffx import vae
from diffx.build import DataSpec
from diffx.errors import DiffxError
from diffx.models.autoencoder import AutoencoderKL, kl_divergence
from diffx.models.discriminator import PatchGAN
from diffx.train_vae import psnr, train_vae
from diffx.validate import validate

DIFFX = shutil.which("diffx") or "diffx"  # installed by `make test`: missing, it fails rather than skips
SPEC = DataSpec(channels=3, image_size=16, num_classes=2, class_names=("a", "b"))
TINY_AE = {"_target_": "diffx.models.autoencoder.AutoencoderKL", "channels": 8, "channel_mult": [1, 2, 2],
           "num_res_blocks": 1, "latent_channels": 4, "norm_groups": 8}

# A second-long CPU run: an 8-wide factor-4 autoencoder on 16x16 shapes, with EMA and the PatchGAN
# switched on halfway, so that resuming is checked through every piece of state.
TINY = ["data.size=16", "data.n=32", "train.batch_size=8", "train.warmup=0", "train.log_every=1",
        "train.save_every=2", "train.holdout=8", "train.ema_decay=0.9", "train.disc_weight=0.5",
        "train.disc_start=2", "autoencoder=kl_f4", "autoencoder.channels=8", "discriminator.channels=8",
        "discriminator.layers=2"]


def _cfg(tmp, *overrides):
    return compose_config("train_vae", TINY + [f"data.cache_dir={tmp / 'cache'}", *overrides])


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- the autoencoder ------------------------------------------------------------------------------

@pytest.mark.parametrize("mult,size,channels,latent", [
    ([1, 2, 4], 16, 3, 3),        # f4
    ([1, 2, 2, 4], 16, 3, 4),     # f8, SD's compression
    ([1, 2, 2, 4], 32, 1, 4),     # grey images
    ([1, 2], 8, 4, 8),            # f2, RGBA, a wide latent
])
def test_encode_decode_shapes(mult, size, channels, latent):
    ae = AutoencoderKL(channels, size, channels=8, channel_mult=mult, latent_channels=latent)
    f = 2 ** (len(mult) - 1)
    assert ae.factor == f and ae.latent_channels == latent
    x = torch.rand(2, channels, size, size) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, latent, size // f, size // f)
    assert ae.decode(mean).shape == x.shape
    recon, mean2, _ = ae(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and torch.equal(mean, mean2)


def test_the_posterior_sample_follows_the_generator():
    ae = AutoencoderKL(3, 8, channels=8, channel_mult=[1, 2])
    x = torch.rand(2, 3, 8, 8)
    a, b = (ae(x, generator=torch.Generator().manual_seed(s))[0] for s in (1, 1))
    c = ae(x, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kl_is_zero_exactly_at_the_prior():
    zero = torch.zeros(3, 4, 2, 2)
    assert torch.equal(kl_divergence(zero, zero), torch.zeros(3))
    g = torch.Generator().manual_seed(0)
    for mean, logvar in ((torch.randn(3, 4, 2, 2, generator=g), zero), (zero, torch.randn(3, 4, 2, 2, generator=g))):
        assert (kl_divergence(mean, logvar) > 0).all()
    # the closed form against a Monte Carlo estimate for one Gaussian
    mean, logvar = torch.tensor([[0.5]]), torch.tensor([[-0.4]])
    z = mean + (0.5 * logvar).exp() * torch.randn(200_000, 1, generator=g)
    log_q = -0.5 * ((z - mean) ** 2 / logvar.exp() + logvar)
    log_p = -0.5 * z ** 2
    assert kl_divergence(mean, logvar).item() == pytest.approx((log_q - log_p).mean().item(), abs=0.01)


@pytest.mark.parametrize("kwargs,key", [
    ({"image_size": 12, "channel_mult": [1, 2, 2, 4]}, "autoencoder.channel_mult"),
    ({"image_size": 16, "channels": 12}, "autoencoder.norm_groups"),
    ({"image_size": 16, "latent_channels": 0}, "autoencoder.latent_channels"),
    ({"image_size": 16, "channel_mult": []}, "autoencoder.channel_mult"),
])
def test_bad_shapes_name_the_key(kwargs, key):
    with pytest.raises(DiffxError) as e:
        AutoencoderKL(3, **{"channels": 8, **kwargs})
    assert key in str(e.value) and "\n" not in str(e.value)


def test_patchgan_scores_patches_and_refuses_a_size_too_small():
    assert PatchGAN(3, 64, channels=8)(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with pytest.raises(DiffxError, match="discriminator.layers"):
        PatchGAN(3, 16, channels=8, layers=3)


def test_psnr_of_a_one_level_error_is_48_db():
    x = torch.zeros(2, 3, 4, 4)
    assert psnr(x + 1 / 127.5, x).tolist() == pytest.approx([48.1308] * 2, abs=1e-3)


# --- the latent scale -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_scaled_latents_have_mean_0_and_std_1(seed):
    """Any model, any images: ``(mean - shift) * scale`` over the fitted data is standardised."""
    torch.manual_seed(seed)
    ae = AutoencoderKL(3, 16, channels=8, channel_mult=[1, 2, 2]).eval()
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_(0, 0.3)
    images = [torch.rand(b, 3, 16, 16) * 2 - 1 for b in (5, 3, 8)]  # uneven batches, tensors or dicts
    scale, shift = vae.fit_scale_shift(ae, [images[0], {"x": images[1]}, images[2]], "cpu")
    with torch.no_grad():
        z = (ae.encode(torch.cat(images))[0].double() - shift) * scale
    assert z.mean().item() == pytest.approx(0, abs=1e-6) and z.std(correction=0).item() == pytest.approx(1, abs=1e-6)


# --- the file -------------------------------------------------------------------------------------

def _random_vae(path, config=None, step=7, scale=0.5, shift=-0.25, weights_of=None):
    """A VAE file of ``config`` (default: TINY_AE) with random weights (of ``weights_of`` if given)."""
    config = {"autoencoder": config or TINY_AE, "data": {"_target_": "diffx.data.shapes", "size": 16}}
    model_cfg = {k: v for k, v in (weights_of or config["autoencoder"]).items() if k != "_target_"}
    ae = AutoencoderKL(3, 16, **model_cfg)
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_()
    vae.save(path, ae.state_dict(), config, SPEC, step, scale, shift)
    return ae


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "vae.safetensors"
    ae = _random_vae(path)
    f = vae.load(path)
    assert (f.scale, f.shift, f.step, f.spec) == (0.5, -0.25, 7, SPEC)
    assert f.config["autoencoder"] == TINY_AE
    import hashlib
    assert f.sha256 == vae.sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not f.autoencoder.training and not any(p.requires_grad for p in f.autoencoder.parameters())
    loaded = f.autoencoder.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in ae.state_dict().items())
    with safe_open(str(path), framework="pt") as h:
        assert h.metadata()["format"] == vae.FORMAT == "diffx.vae/1"


def _refused(path) -> str:
    with pytest.raises(DiffxError) as e:
        vae.load(path)
    message = str(e.value)
    assert message.startswith(f"latent.ckpt={path}: ") and "\n" not in message
    return message


def test_refuses_a_corrupted_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    _random_vae(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a valid safetensors file" in _refused(path)
    path.write_bytes(b"\xff" * 64)
    assert "not a valid safetensors file" in _refused(path)
    assert "no such file" in _refused(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("target", ["os.system", "diffx.data.shapes", "diffx.models.unet.UNet"])
def test_refuses_a_target_the_shipped_tree_does_not_name_there(tmp_path, target):
    path = tmp_path / "vae.safetensors"
    _random_vae(path)
    meta = dict(safe_open(str(path), framework="pt").metadata())
    config = json.loads(meta["config"])
    config["autoencoder"]["_target_"] = target
    save_file(_tensors(path), str(path), metadata={**meta, "config": json.dumps(config)})
    assert f"autoencoder._target_='{target}'" in _refused(path) and "refusing to load" in _refused(path)


def test_refuses_weights_that_do_not_fit_the_config(tmp_path):
    path = tmp_path / "vae.safetensors"
    _random_vae(path, weights_of={**TINY_AE, "channels": 16})  # weights of a wider model, config says 8
    assert "weights do not fit" in _refused(path)


@pytest.mark.parametrize("edit,words", [
    ({"format": "diffx.model/1"}, "expected 'diffx.vae/1'"),
    ({"scale": "nan"}, "scale=nan"),
    ({"scale": "0"}, "scale=0.0"),
    ({"spec": "{\"channels\": -3, \"image_size\": 16}"}, "spec.channels=-3"),
    ({"config": "[1, 2]"}, "lacks the autoencoder section"),
    ({"config": json.dumps({"autoencoder": {**TINY_AE, "bogus": 1}})}, "autoencoder.bogus"),
])
def test_refuses_bad_metadata(tmp_path, edit, words):
    path = tmp_path / "vae.safetensors"
    _random_vae(path)
    meta = dict(safe_open(str(path), framework="pt").metadata())
    save_file(_tensors(path), str(path), metadata={**meta, **edit})
    assert words in _refused(path)


# --- diffx train-vae ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 4-step tiny run straight through."""
    tmp = tmp_path_factory.mktemp("vae_run")
    cfg = _cfg(tmp, "train.steps=4", f"run_dir={tmp / 'run'}")
    validate(cfg, "train-vae")
    return tmp, train_vae(cfg)


def test_a_tiny_run_writes_the_vae_the_grid_and_the_psnr(straight):
    _, run = straight
    f = vae.load(run / "vae.safetensors")
    assert f.step == 4 and f.autoencoder.factor == 4 and f.spec.image_size == 16
    assert f.config["data"]["n"] == 32 and f.scale > 0
    report = json.loads((run / "vae_eval.json").read_text())
    assert report["images"] == 8 and report["step"] == 4 and report["psnr_db"] > 0
    grid = Image.open(run / "recon.png")
    assert grid.text["top"] == "held-out images" and grid.height > grid.width  # originals above reconstructions
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["d_loss"] > 0 for r in log] == [False, False, True, True]  # the PatchGAN from step 2 on


def test_resume_is_bit_exact(straight):
    """Stopped at step 2 and continued to 4 equals the straight 4-step run: weights, EMA, latent scale."""
    tmp, run = straight
    split = tmp / "split"
    train_vae(_cfg(tmp, "train.steps=2", f"run_dir={split}"))
    train_vae(_cfg(tmp, "train.steps=4", f"run_dir={split}", f"resume={split}"))
    for name in ("vae.safetensors", "state/model.safetensors", "state/ema.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(split / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (vae.load(run / "vae.safetensors").scale, vae.load(run / "vae.safetensors").shift) == \
           (vae.load(split / "vae.safetensors").scale, vae.load(split / "vae.safetensors").shift)


def test_refuses_to_overwrite_a_run_without_state(tmp_path):
    run = tmp_path / "run"
    _random_vae(run / "vae.safetensors")
    with pytest.raises(DiffxError, match="no resume state; refusing to overwrite"):
        train_vae(_cfg(tmp_path, "train.steps=2", f"run_dir={run}"))


def test_a_holdout_that_leaves_too_little_to_train_on_fails(tmp_path):
    with pytest.raises(DiffxError, match="train.holdout=30"):
        train_vae(_cfg(tmp_path, "train.steps=2", "train.holdout=30", f"run_dir={tmp_path / 'run'}"))


# the key each error must name -> the overrides that make it
CONFIG_ERRORS = {
    "autoencoder.channel_mult": ["data.size=20", "autoencoder=kl_f8"],
    "autoencoder.norm_groups": ["autoencoder.norm_groups=3"],
    "autoencoder.bogus": ["+autoencoder.bogus=1"],
    "autoencoder.channels": ["autoencoder.channels=abc"],
    "train.holdout": ["train.holdout=0"],
    "train.kl_weight": ["train.kl_weight=-1"],
    "train.disc_start": ["train.disc_start=-1"],
    "train.mixed_precision": ["train.mixed_precision=fp8"],
    "discriminator.layers": ["discriminator.layers=3"],  # 16 / 2^3 leaves no patch
    "resume=/no/such/run": ["resume=/no/such/run"],
}


@pytest.mark.parametrize("key", CONFIG_ERRORS)
def test_config_errors_name_the_key(tmp_path, key):
    with pytest.raises(DiffxError) as e:
        validate(_cfg(tmp_path, *CONFIG_ERRORS[key], f"run_dir={tmp_path / 'run'}"), "train-vae")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_key_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([DIFFX, "train-vae", "train.bogus=1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffx train-vae: error: train.bogus") and "holdout" in lines[0]
    assert not (tmp_path / "runs").exists()
