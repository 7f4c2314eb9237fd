"""``diffx sample init_image= strength= mask=``: img2img (SDEdit) at strength 1 is plain sampling and at 0
the input; inpainting (RePaint) keeps the unmasked part exactly, because every sampler carries the kept
part along the forward marginal (``inpaint.Known``); bad inputs fail in one line naming the key."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN, compose_config, saved_random_model
from PIL import Image

from diffx import grids, samplers, schedules
from diffx.build import DataSpec
from diffx.data import fit
from diffx.errors import DiffxError
from diffx.generate import check_start, image_start
from diffx.latent import Latent
from diffx.sample import sample
from diffx.samplers import inpaint, learned
from diffx.samplers import plan as plans
from diffx.validate import validate

SIZE = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random-weight flow and DDPM label checkpoints of 8x8 RGB data; a 12x10 input image (fitted to 8x8
    on the way in) and a 16x16 mask whose left half is white (redrawn), and an all-black one."""
    root = tmp_path_factory.mktemp("img2img")
    for objective in ("flow", "ddpm"):
        saved_random_model(compose_config("train", TINY_TRAIN + [f"objective={objective}"]), DataSpec(3, SIZE, 18),
                           root / f"{objective}.safetensors", step=1)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / "input.png")
    half = np.zeros((16, 16), np.uint8)
    half[:, :8] = 255
    Image.fromarray(half).save(root / "half.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "black.png")
    return root


def _draw(files, out, *overrides, objective="flow") -> np.ndarray:
    """Two images (seeds 0 and 1) drawn by ``diffx sample``, as (2, H, W, 3) uint8."""
    sample(compose_config("sample", [f"ckpt={files / f'{objective}.safetensors'}", "n=2", "steps=3", "label=3",
                                     f"out={out}", *overrides]))
    return np.stack([np.asarray(Image.open(out / f"seed{s:06d}.png")) for s in (0, 1)])


def _input(files) -> np.ndarray:
    with Image.open(files / "input.png") as im:
        return np.array(fit(im, SIZE))


@pytest.mark.parametrize("objective,sampler", [("flow", "ddim"), ("flow", "dpmpp"), ("ddpm", "dpmpp"),
                                               ("ddpm", "ddpm")])
def test_strength_one_is_plain_sampling_and_zero_gives_the_input_back(files, tmp_path, objective, sampler):
    init = f"init_image={files / 'input.png'}"
    plain = _draw(files, tmp_path / "plain", f"sampler={sampler}", objective=objective)
    one = _draw(files, tmp_path / "one", f"sampler={sampler}", init, "strength=1", objective=objective)
    np.testing.assert_array_equal(one, plain)
    zero = _draw(files, tmp_path / "zero", f"sampler={sampler}", init, "strength=0", objective=objective)
    np.testing.assert_array_equal(zero, np.stack([_input(files)] * 2))
    half = _draw(files, tmp_path / "half", f"sampler={sampler}", init, "strength=0.5", objective=objective)
    assert not np.array_equal(half, plain) and not np.array_equal(half, zero)
    with Image.open(tmp_path / "half" / "seed000000.png") as im:
        assert float(im.text["strength"]) == 0.5 and im.text["init_image"].endswith("input.png")


@pytest.mark.parametrize("sampler,extra", [("ddim", []), ("dpmpp", []), ("heun", []), ("unipc", []),
                                           ("ddpm", []), ("ddim", ["resample=3"]), ("dpmpp", ["strength=0.7"])])
def test_inpainting_keeps_the_unmasked_part_exactly(files, tmp_path, sampler, extra):
    init = f"init_image={files / 'input.png'}"
    out = _draw(files, tmp_path / "half", f"sampler={sampler}", init, f"mask={files / 'half.png'}", *extra)
    want = _input(files)
    np.testing.assert_array_equal(out[:, :, SIZE // 2:], np.stack([want[:, SIZE // 2:]] * 2))  # black: kept
    assert not np.array_equal(out[:, :, : SIZE // 2], np.stack([want[:, : SIZE // 2]] * 2))  # white: redrawn
    black = _draw(files, tmp_path / "black", f"sampler={sampler}", init, f"mask={files / 'black.png'}", *extra)
    np.testing.assert_array_equal(black, np.stack([want] * 2))


def _toy_denoiser(schedule):
    """Any x -> (x0_hat, noise_hat) pair consistent with x, recording every point it is called at."""
    seen = []

    def denoise(x, t):
        seen.append((x.clone(), t))
        (alpha, sigma), = schedule.table(torch.tensor([t]))
        x0 = torch.tanh(x + 0.3).flip(-1)
        return x0, (x - alpha * x0) / sigma

    return denoise, seen


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp", "dpmpp_3m", "unipc", "ipndm"])
@pytest.mark.parametrize("schedule", [schedules.FlowLinear(), schedules.ddpm_cosine()], ids=["flow", "ddpm"])
def test_every_sampler_visits_the_kept_part_on_the_forward_marginal(name, schedule):
    """What ``inpaint.Known`` rests on: with the kept part's (x0_hat, noise_hat) = (x0, z), each point the
    sampler visits is ``alpha_t x0 + sigma_t z`` there, so the wrapper is RePaint's replacement of x_t."""
    g = torch.Generator().manual_seed(0)
    x0, z = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    ts = inpaint.from_time(grids.logsnr(6, schedule), 0.8)
    denoise, seen = _toy_denoiser(schedule)
    out = getattr(samplers, name)(inpaint.Known(denoise, schedule, x0, mask), schedule,
                                  inpaint.start(schedule, x0, z, float(ts[0])), ts)
    for x, t in seen:
        (alpha, sigma), = schedule.table(torch.tensor([t]))
        torch.testing.assert_close(x[..., 2:], (alpha * x0 + sigma * z)[..., 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., 2:], x0[..., 2:], atol=1e-5, rtol=1e-5)


def test_the_grid_is_rescaled_to_start_at_the_strength():
    schedule = schedules.FlowLinear()
    ts = grids.uniform(10, schedule)
    torch.testing.assert_close(inpaint.from_time(ts, 0.6), grids.uniform(10, schedule, t_max=0.6))
    assert torch.equal(inpaint.from_time(ts, 1.0), ts) and inpaint.from_time(ts, 0.0).tolist() == [0.0]
    karras = grids.karras(8, schedule)
    cut = inpaint.from_time(karras, 0.3)
    assert len(cut) == len(karras) and cut[0] == 0.3 and cut[-1] == 0 and (cut.diff() < 0).all()


class _Halving(Latent):
    """A stand-in latent space of half the resolution (a VAE's role, without one)."""

    factor = 2

    def channels(self, data_channels):
        return data_channels

    def encode(self, x):
        return F.avg_pool2d(x, 2)

    def decode(self, x0):
        return F.interpolate(x0, scale_factor=2)


def test_the_image_and_mask_go_into_the_models_space(files):
    parts = types.SimpleNamespace(spec=DataSpec(3, SIZE), latent=_Halving())
    start = image_start(parts, files / "input.png", None, files / "half.png")
    assert start.x0.shape == (1, 3, 4, 4) and start.mask.shape == (1, 1, 4, 4) and start.strength == 1.0
    assert start.mask[..., :2].all() and not start.mask[..., 2:].any()  # area-averaged, then thresholded
    want = torch.from_numpy(_input(files)).permute(2, 0, 1)[None].float() / 127.5 - 1
    torch.testing.assert_close(start.x0, F.avg_pool2d(want, 2))
    plain = image_start(parts, files / "input.png")
    assert plain.strength == 0.6 and plain.mask is None


def test_a_fitted_solver_is_refused(files):
    schedule = schedules.FlowLinear()
    solver = learned.trace(samplers.unipc, schedule, grids.uniform(4, schedule))
    with pytest.raises(DiffxError, match="init_image"):
        check_start(plans.make(solver, grids.uniform, None, schedule))


@pytest.mark.parametrize("overrides,key", [
    (["init_image=missing.png"], "init_image=missing.png"), (["strength=1.5", "INIT"], "strength=1.5"),
    (["strength=-0.1", "INIT"], "strength=-0.1"), (["mask=MASK"], "mask="), (["strength=0.5"], "strength=0.5"),
    (["resample=2", "INIT"], "resample=2"), (["resample=0", "INIT", "mask=MASK"], "resample=0"),
    (["mask=missing.png", "INIT"], "mask=missing.png")])
def test_bad_image_inputs_fail_naming_the_key(files, overrides, key):
    swap = {"INIT": f"init_image={files / 'input.png'}", "mask=MASK": f"mask={files / 'half.png'}"}
    cfg = compose_config("sample", [f"ckpt={files / 'flow.safetensors'}", *(swap.get(o, o) for o in overrides)])
    with pytest.raises(DiffxError, match=key) as e:
        validate(cfg, "sample")
    assert "\n" not in str(e.value)
