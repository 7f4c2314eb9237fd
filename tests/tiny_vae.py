"""A tiny, randomly initialised diffusers AutoencoderKL saved to a folder: the real code path of
``latent=diffusers_vae`` with no network and no downloaded weights."""

from __future__ import annotations

from pathlib import Path


def save_diffusers_vae(path: Path, seed: int = 0, safetensors: bool = True, scaling_factor: float = 0.5,
                       shift_factor: float = 0.1) -> Path:
    """Factor 2 (two levels), 4 latent channels, with a non-default scale and shift to read back."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
                        shift_factor=shift_factor)
    vae.save_pretrained(str(path), safe_serialization=safetensors)
    return Path(path)


def save_diffx_vae(path: Path, seed: int = 0, image_size: int = 16) -> Path:
    """A ``diffx train-vae`` file (``diffx.vae.save``) of a freshly initialised factor-2, 4-channel autoencoder."""
    import torch

    from diffx import vae
    from diffx.build import DataSpec
    from diffx.models.autoencoder import AutoencoderKL

    config = {"_target_": "diffx.models.autoencoder.AutoencoderKL", "channels": 8, "channel_mult": [1, 2],
              "num_res_blocks": 1, "latent_channels": 4, "norm_groups": 4}
    torch.manual_seed(seed)
    ae = AutoencoderKL(3, image_size, **{k: v for k, v in config.items() if k != "_target_"})
    spec = DataSpec(3, image_size)
    vae.save(path, ae.state_dict(), {"autoencoder": config, "data": {"_target_": "diffx.data.shapes"}}, spec,
             step=0, scale=2.0, shift=0.1)
    return Path(path)
