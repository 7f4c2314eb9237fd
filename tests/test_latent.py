"""The latent-space interface: shapes follow from it, and a cacheable encoding runs once, not per batch."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TRAIN, compose_config
from diffx import checkpoint
from diffx.build import DataSpec, build, parts_config
from diffx.latent import Identity, Latent


class Pool(Latent):
    """A stand-in for a VAE: 2x average pooling, deterministic, so its encodings are cached."""

    factor, scale, x0_range, cache = 2, 2.0, None, True
    calls: list[int] = []

    def channels(self, data_channels: int) -> int:
        return data_channels

    def encode(self, x):
        Pool.calls.append(len(x))
        return F.avg_pool2d(x, 2) * self.scale

    def decode(self, x0):
        return F.interpolate(x0 / self.scale, scale_factor=2)


def test_identity_implements_the_interface():
    latent = Identity()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert latent.shape(3, 8) == (3, 8, 8) and latent.x0_range == (-1.0, 1.0) and not latent.cache
    assert torch.equal(latent.decode(latent.encode(x)), x) and (latent.scale, latent.shift) == (1.0, 0.0)


def test_a_cacheable_latent_encodes_the_data_once_before_the_loop(tmp_path):
    from diffx.train import train

    Pool.calls.clear()
    steps = ["train.steps=2", "train.log_every=1", "train.save_every=2"]
    overrides = [o for o in TINY_TRAIN if not o.startswith(("train.steps", "train.log_every", "train.save_every"))]
    cfg = compose_config("train", overrides + steps + [
        "latent._target_=test_latent.Pool", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    run = train(cfg)
    # data.n=16 images encoded up front (one batch), then two training steps with no encode at all
    assert Pool.calls == [16] and (run / "model.safetensors").is_file()
    # the model denoises the latent's shape, which the parts derive from the data's
    assert build(cfg, DataSpec(3, 8)).x0_shape == (3, 4, 4)


def test_a_checkpoint_naming_a_latent_diffx_does_not_ship_is_refused(tmp_path):
    """Trust: a stored config may name only the shipped latent classes (diffx.trust)."""
    import pytest

    from diffx.errors import DiffxError

    cfg = compose_config("train", TINY_TRAIN + ["latent._target_=test_latent.Pool"])
    checkpoint.save(tmp_path / "m.safetensors", build(cfg, DataSpec(3, 8)).model.state_dict(), parts_config(cfg),
                    DataSpec(3, 8), step=0)
    with pytest.raises(DiffxError, match="not a diffx class for latent"):
        checkpoint.load(tmp_path / "m.safetensors")


# --- latent=diffusers_vae: a local AutoencoderKL folder -------------------------------------------------

def test_a_diffusers_vae_declares_its_shape_scale_and_shift(tmp_path):
    from diffusers import AutoencoderKL

    from diffx.latent import DiffusersVAE
    from tiny_vae import save_diffusers_vae

    folder = save_diffusers_vae(tmp_path / "vae")
    latent = DiffusersVAE(str(folder))
    assert (latent.factor, latent.scale, latent.shift, latent.cache) == (2, 0.5, 0.1, True)
    assert latent.shape(3, 16) == (4, 8, 8) and latent.x0_range is None
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = latent.encode(x)
    # x0 is the scaled posterior mean, which decode undoes before the decoder
    ref = AutoencoderKL.from_pretrained(str(folder))
    torch.testing.assert_close(x0 / 0.5 + 0.1, ref.encode(x).latent_dist.mean)
    torch.testing.assert_close(latent.decode(x0), ref.decode(x0 / 0.5 + 0.1).sample.clamp(-1, 1))


def test_a_diffusers_vae_is_refused_without_safetensors_or_with_other_weights(tmp_path):
    import pytest

    from diffx.errors import DiffxError
    from diffx.latent import DiffusersVAE
    from tiny_vae import save_diffusers_vae

    pickled = save_diffusers_vae(tmp_path / "pickled", safetensors=False)  # a .bin: never unpickled
    with pytest.raises(DiffxError, match="expected a diffusers AutoencoderKL folder"):
        DiffusersVAE(str(pickled))
    good = DiffusersVAE(str(save_diffusers_vae(tmp_path / "a", seed=0)))
    with pytest.raises(DiffxError, match="not the ones the model was trained with"):
        DiffusersVAE(str(save_diffusers_vae(tmp_path / "b", seed=1)), sha256=good.sha256)
    with pytest.raises(DiffxError, match="latent.path="):
        DiffusersVAE(str(tmp_path / "missing"))


# latent=vae (a diffx train-vae file) and latent=diffusers_vae (a folder): how to make one, the key naming
# it, the Latent class, and what the error says when other weights sit at the same place.
KINDS = {
    "vae": ("vae.safetensors", "latent.ckpt", "VAE", "not the one the model was trained with"),
    "diffusers_vae": ("vae", "latent.path", "DiffusersVAE", "not the ones the model was trained with"),
}


def _make_vae(kind, path, seed):
    import shutil

    from tiny_vae import save_diffusers_vae, save_diffx_vae

    if path.is_dir():
        shutil.rmtree(path)
    return (save_diffx_vae if kind == "vae" else save_diffusers_vae)(path, seed=seed)


@pytest.mark.parametrize("kind", KINDS)
def test_latent_diffusion_trains_caches_samples_and_pins_its_vae(kind, tmp_path, monkeypatch):
    """latent=vae and latent=diffusers_vae end to end: the model is built for the latents, the training
    set is encoded once and read back from the disk cache by the next run, sampling decodes to the
    data's size, and the checkpoint refuses a different VAE at the same place."""
    from diffx import generate, latent
    from diffx.errors import DiffxError
    from diffx.train import train

    name, key, cls, refusal = KINDS[kind]
    folder = _make_vae(kind, tmp_path / name, seed=0)
    base = [o for o in TINY_TRAIN if not o.startswith("data.size")] + [
        "data.size=16", f"latent={kind}", f"{key}={folder}", f"latent.cache_dir={tmp_path / 'latents'}",
        f"data.cache_dir={tmp_path / 'shapes'}"]
    run = train(compose_config("train", base + [f"run_dir={tmp_path / 'run'}"]))
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 1

    calls = []
    original = getattr(latent, cls).encode
    monkeypatch.setattr(getattr(latent, cls), "encode", lambda self, x: calls.append(len(x)) or original(self, x))
    train(compose_config("train", base + [f"run_dir={tmp_path / 'again'}"]))
    assert calls == []  # the second run read the cached encodings

    parts, ckpt = checkpoint.load(run / "model.safetensors")
    assert parts.x0_shape == (4, 8, 8) and ckpt.parts["latent"]["sha256"] == parts.latent.sha256
    vae_names = {f"autoencoder.{k}" for k in parts.latent.autoencoder.state_dict()} | set(parts.latent.autoencoder.state_dict())
    assert not vae_names & set(ckpt.weights)  # the VAE's weights stay in their own file
    plan = generate.sampling_plan(compose_config("sample", ["steps=2"]), parts.objective.schedule)
    images, _ = generate.generate(parts, plan, generate.Request([0, 1], [0, 1]), 2, "cpu")
    assert images.shape == (2, 16, 16, 3)

    _make_vae(kind, folder, seed=1)  # other weights at the same place
    with pytest.raises(DiffxError, match=refusal):
        checkpoint.load(run / "model.safetensors")
