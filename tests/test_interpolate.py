"""``diffx interpolate``: slerp keeps the noise's norm, the end frames are ``diffx sample``'s images of the
two seeds (with one condition, two labels or two prompts), and bad requests fail in one line naming the key."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose_config, saved_random_model
from PIL import Image

from diffx.build import DataSpec
from diffx.errors import DiffxError
from diffx.interpolate import interpolate
from diffx.noise import slerp
from diffx.sample import sample
from diffx.validate import validate

SIZE = 8
COMMON = ["steps=3", "cfg=2", "sampler=ddim"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Random-weight label and text (tiny encoder) checkpoints of 8x8 RGB data."""
    root = tmp_path_factory.mktemp("interp")
    saved_random_model(compose_config("train", TINY_TRAIN), DataSpec(3, SIZE, 18), root / "label.safetensors", step=1)
    text = compose_config("train", TINY_TRAIN + ["text_encoder=tiny", "text_encoder.width=16", "text_encoder.depth=1",
                                                 "text_encoder.heads=2"])
    saved_random_model(text, DataSpec(3, SIZE), root / "text.safetensors", step=1)
    return root


def _frames(path, n: int) -> list[np.ndarray]:
    """The n frames of a strip PNG, its pixel repetition undone (diffx.interpolate.strip, pad 2)."""
    up = max(1, 128 // SIZE)
    pixels = np.asarray(Image.open(path))[::up, ::up]
    return [pixels[2: 2 + SIZE, 2 + k * (SIZE + 2): 2 + k * (SIZE + 2) + SIZE] for k in range(n)]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_slerp_keeps_the_norm_of_gaussian_noise_and_returns_the_ends_exactly():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    d = a.numel()
    for w in torch.linspace(0, 1, 9).tolist():
        assert abs(slerp(a, b, w).norm().item() / math.sqrt(d) - 1) < 0.1
    assert abs((0.5 * a + 0.5 * b).norm().item() / math.sqrt(d / 2) - 1) < 0.1  # the straight line's midpoint shrinks
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    unit_a, unit_b = a / a.norm(), b / b.norm()  # on the sphere the arc stays on it
    assert all(abs(slerp(unit_a, unit_b, w).norm().item() - 1) < 1e-6 for w in (0.1, 0.5, 0.9))
    assert torch.allclose(slerp(a, a, 0.3), a)  # parallel ends: the line


@pytest.mark.parametrize("label", ["random", "[2,9]", "4"])
def test_end_frames_are_diffx_samples_images_of_the_two_seeds(ckpts, tmp_path, label):
    """label=random (each seed's own label: 7 and 8 here, so the mixture runs), a pair, or one label."""
    ckpt = f"ckpt={ckpts / 'label.safetensors'}"
    png, gif = interpolate(compose_config("interpolate", [ckpt, "seeds=[4,5]", "frames=4", f"label={label}",
                                                          f"out={tmp_path / 'i'}", *COMMON]))
    sample(compose_config("sample", [ckpt, "seed=4", "n=2", f"label={label}", f"out={tmp_path / 's'}", *COMMON]))
    frames = _frames(png, 4)
    np.testing.assert_array_equal(frames[0], _png(tmp_path / "s" / "seed000004.png"))
    np.testing.assert_array_equal(frames[-1], _png(tmp_path / "s" / "seed000005.png"))
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[-1])
    with Image.open(gif) as im:
        assert im.n_frames == 4 + 2 and im.info["loop"] == 0  # a to b and back
    text = Image.open(png).text
    assert text["seeds"] == "4,5" and text["ends"] == {"random": "7 -> 8", "[2,9]": "2 -> 9", "4": "4 -> 4"}[label]


def test_a_prompt_pair_ends_with_each_prompts_image(ckpts, tmp_path):
    ckpt = f"ckpt={ckpts / 'text.safetensors'}"
    prompts = "prompt=[a red circle,a blue square]"
    png, _ = interpolate(compose_config("interpolate", [ckpt, "seeds=[0,1]", "frames=3", prompts,
                                                        f"out={tmp_path / 'i'}", *COMMON]))
    sample(compose_config("sample", [ckpt, "seed=0", "n=2", prompts, f"out={tmp_path / 's'}", *COMMON]))
    frames = _frames(png, 3)
    np.testing.assert_array_equal(frames[0], _png(tmp_path / "s" / "00-a-red-circle" / "seed000000.png"))
    np.testing.assert_array_equal(frames[-1], _png(tmp_path / "s" / "01-a-blue-square" / "seed000001.png"))


def test_outputs_are_not_overwritten_without_overwrite_true(ckpts, tmp_path):
    args = [f"ckpt={ckpts / 'label.safetensors'}", "frames=2", "steps=1", f"out={tmp_path}"]
    interpolate(compose_config("interpolate", args))
    with pytest.raises(DiffxError, match="already exists"):
        interpolate(compose_config("interpolate", args))
    interpolate(compose_config("interpolate", args + ["overwrite=true"]))


@pytest.mark.parametrize("override,key", [("sampler=ddpm", "sampler=ddpm is stochastic"),
                                          ("sampler=ddim sampler.eta=1", "sampler=ddim is stochastic"),
                                          ("frames=1", "frames=1"), ("seeds=[1]", "seeds="),
                                          ("seeds=[1,-2]", "seeds="), ("label=[1,2,3]", "label="),
                                          ("label=all", "label=all"), ("steps=0", "steps=0")])
def test_bad_requests_fail_naming_the_key(ckpts, override, key):
    cfg = compose_config("interpolate", [f"ckpt={ckpts / 'label.safetensors'}", *override.split()])
    with pytest.raises(DiffxError, match=key.replace("[", r"\[")) as e:
        validate(cfg, "interpolate")
    assert "\n" not in str(e.value)


def test_a_stochastic_sampler_is_refused_by_the_command_itself(ckpts, tmp_path):
    cfg = compose_config("interpolate", [f"ckpt={ckpts / 'label.safetensors'}", "sampler=dpmpp_sde",
                                         f"out={tmp_path}"])
    with pytest.raises(DiffxError, match="stochastic"):
        interpolate(cfg)
