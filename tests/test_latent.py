"""The latent-space interface: shapes follow from it, and a cacheable encoding runs once, not per batch."""

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
