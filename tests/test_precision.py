"""``precision=bf16`` of the drawing commands (``diffx.precision``): the network under bf16 autocast, its output
back in float32, close to the float32 network's; the sampler draws the same images to bf16 round-off; bad values
and the uncertainty maps (float32 only) are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose_config, perturb_all
from PIL import Image

from diffx import checkpoint, precision
from diffx.build import DataSpec, Parts, build, parts_config
from diffx.errors import DiffxError
from diffx.generate import takes_guidance
from diffx.models.mmdit import MMDiT
from diffx.models.unet import UNet
from diffx.sample import sample
from diffx.validate import validate

MODELS = {
    "unet": lambda **kw: UNet(3, 8, num_classes=3, channels=8, channel_mult=(1, 2), attn_resolutions=(4,), **kw),
    "mmdit": lambda **kw: MMDiT(3, 8, num_classes=3, width=16, depth=1, heads=2, **kw),
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_bf16_network_returns_float32_close_to_the_float32_network(arch):
    gen = torch.Generator().manual_seed(0)
    model = MODELS[arch]().eval()
    perturb_all(model, gen)
    x, t = torch.randn(4, 3, 8, 8, generator=gen), torch.rand(4, generator=gen)
    cond = {"label": torch.tensor([0, 1, 2, -1])}
    parts = precision.apply(Parts(model, None, None), "bf16", torch.device("cpu"))
    with torch.no_grad():
        want, got = model(x, t, cond), parts.model(x, t, cond)
    assert got.dtype == torch.float32 and not torch.equal(got, want)  # it did run in bf16
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())


def test_fp32_leaves_the_parts_as_they_are_and_bad_values_fail():
    parts = Parts(MODELS["unet"](), None, None)
    assert precision.apply(parts, "fp32", torch.device("cpu")) is parts
    with pytest.raises(DiffxError, match="precision='fp16': expected one of fp32, bf16"):
        precision.apply(parts, "fp16", torch.device("cpu"))


def test_a_guided_student_is_still_seen_as_one():
    student = MODELS["unet"](guidance_embed=True)
    wrapped = precision.apply(Parts(student, None, None), "bf16", torch.device("cpu")).model
    assert takes_guidance(student) and takes_guidance(wrapped)
    assert not takes_guidance(precision.apply(Parts(MODELS["unet"](), None, None), "bf16", torch.device("cpu")).model)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """A checkpoint of the tiny training config's UNet with random weights everywhere (a 2-step run's output
    layer is still ~0, so both precisions would draw the same images and the test would show nothing)."""
    cfg = compose_config("train", TINY_TRAIN)
    spec = DataSpec(channels=3, image_size=8, num_classes=3)
    path = tmp_path_factory.mktemp("random") / "model.safetensors"
    model = build(cfg, spec).model
    perturb_all(model, torch.Generator().manual_seed(1))  # not conftest.saved_random_model's N(0, 1) weights:
    checkpoint.save(path, model.state_dict(), parts_config(cfg), spec, step=0)  # they make the sampler chaotic
    return path


def test_sample_in_bf16_draws_the_float32_images_to_round_off(random_ckpt, tmp_path):
    common = [f"ckpt={random_ckpt}", "n=3", "steps=4", "sampler=ddim", "cfg=2", "label=all"]
    sample(compose_config("sample", [*common, f"out={tmp_path / 'fp32'}"]))
    sample(compose_config("sample", [*common, f"out={tmp_path / 'bf16'}", "precision=bf16"]))
    diffs = []
    for i in range(3):
        a, b = (np.asarray(Image.open(next((tmp_path / p).rglob(f"seed{i:06d}.png"))), dtype=float)
                for p in ("fp32", "bf16"))
        diffs.append(np.abs(a - b))
    assert max(d.max() for d in diffs) > 0  # it did run in bf16
    assert max(d.mean() for d in diffs) < 4  # of 255: bf16 round-off, not another image


def test_bad_precision_and_bf16_uncertainty_are_one_line_errors(tiny_run, tmp_path):
    ckpt = f"ckpt={tiny_run / 'model.safetensors'}"
    with pytest.raises(DiffxError, match="precision='fp16'"):
        validate(compose_config("sample", [ckpt, "precision=fp16"]), "sample")
    with pytest.raises(DiffxError, match="uncertainty.enabled=true"):
        sample(compose_config("sample", [ckpt, "precision=bf16", "uncertainty.enabled=true", f"out={tmp_path}"]))
