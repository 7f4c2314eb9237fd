"""Every option of every config group composes and instantiates (a new YAML is tested automatically)."""


import numpy as np
import pytest
import torch

from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from diffx.build import DataSpec, build
from diffx.config import config_dir

CONF = config_dir()
SAMPLE_GROUPS = {"sampler", "grid"}
TRAIN_VAE_GROUPS = {"autoencoder"}  # composed in conf/train_vae.yaml
OVERLAY_GROUPS = {"experiment"}  # appended with +group=option, checked below on their own


def _options():
    """(group, option) for every YAML below conf/ except the top-level command configs."""
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != ".":
            yield group, path.stem


OPTIONS = list(_options())


def _compose(name, overrides):
    return compose_config(name, overrides)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random CLIP and T5 encoders saved locally (no network), for options that need a path."""
    import tiny_hf

    return tiny_hf.save_all(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def diffusers_vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL saved locally (no network), for latent=diffusers_vae."""
    from tiny_vae import save_diffusers_vae

    return save_diffusers_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def diffx_vae_file(tmp_path_factory):
    """A tiny freshly initialised diffx VAE file, for latent=vae."""
    from tiny_vae import save_diffx_vae

    return save_diffx_vae(tmp_path_factory.mktemp("vae") / "vae.safetensors")


# Options with a required (???) key: the overrides that fill it, from the fixtures they need.
REQUIRED = {
    ("latent", "vae"): lambda f: [f"latent.ckpt={f('diffx_vae_file')}", f"latent.cache_dir={f('tmp_path') / 'latents'}"],
    ("latent", "diffusers_vae"): lambda f: [f"latent.path={f('diffusers_vae_dir')}",
                                            f"latent.cache_dir={f('tmp_path') / 'latents'}"],
    ("data", "imagefolder"): lambda f: [f"data.path={f('image_dir')}"],
    ("data", "hf"): lambda f: [f"data.path={f('hf_dataset_dir')}"],
    ("text_encoder", "hf"): lambda f: [f"text_encoder.path={f('hf_dirs')['clip']}"],
    ("text_encoder", "clip_t5"): lambda f: [f"text_encoder.encoders.clip.path={f('hf_dirs')['clip']}",
                                            f"text_encoder.encoders.t5.path={f('hf_dirs')['t5']}"],
}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for k, cls in enumerate(["cats", "dogs"]):
        (root / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((20, 20, 3), 60 * k + 10 * i, np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def hf_dataset_dir(tmp_path_factory):
    """A tiny dataset written with datasets' save_to_disk (no network), for data=hf."""
    import datasets

    root = tmp_path_factory.mktemp("hf_dataset") / "ds"
    images = [Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)) for i in range(4)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})
                               ).save_to_disk(str(root))
    return root


def test_the_tree_has_every_required_group():
    groups = {g for g, _ in OPTIONS}
    assert {"model", "objective", "schedule", "sampler", "data", "latent", "grid"} <= groups
    assert {("model", "unet"), ("model", "mmdit"), ("objective", "ddpm"), ("objective", "flow"),
            ("schedule", "linear"), ("schedule", "cosine"), ("latent", "none"), ("data", "shapes"),
            ("sampler", "ddim"), ("sampler", "euler"), ("sampler", "dpmpp")} <= set(OPTIONS)


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] not in OVERLAY_GROUPS],
                         ids=lambda v: str(v))
def test_option_composes_and_instantiates(group, option, tmp_path, request):
    if group in SAMPLE_GROUPS:
        train_cfg = _compose("train", ["objective=ddpm"])
        schedule = instantiate(train_cfg.schedule)
        extra = []
        if (group, option) == ("sampler", "learned"):  # a solver file, as `diffx calibrate` writes
            from diffx import grids, samplers
            from diffx.samplers import learned

            learned.save(tmp_path / "solver.safetensors", learned.trace(samplers.unipc, schedule, grids.uniform(8, schedule)))
            extra = [f"sampler.path={tmp_path / 'solver.safetensors'}"]
        cfg = _compose("sample", [f"{group}={option}", *extra])
        ts = instantiate(cfg.grid)(8, schedule)
        assert callable(instantiate(cfg.sampler)) and ts[-1] == 0 and len(ts) == 9
        return
    if group in TRAIN_VAE_GROUPS:  # shapes from the data are supplied by code, as diffx train-vae does
        cfg = _compose("train_vae", [f"{group}={option}", "data.size=16"])
        ae = instantiate(cfg.autoencoder, in_channels=3, image_size=cfg.data.size)
        assert ae.decode(ae.encode(torch.zeros(1, 3, 16, 16))[0]).shape == (1, 3, 16, 16)
        return
    overrides = [f"{group}={option}", "data.size=16"]
    overrides += REQUIRED.get((group, option), lambda f: [])(request.getfixturevalue)
    if not (group == "data" and option in ("imagefolder", "hf", "digits")):  # digits: a fixed bundled set
        overrides += ["data.n=16", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = _compose("train", overrides)
    data = instantiate(cfg.data)
    spec = DataSpec.of(data)
    parts = build(cfg, spec)
    assert parts.model is not None and parts.objective.schedule is not None


@pytest.mark.parametrize("objective,schedule,expect", [
    ("ddpm", None, "diffx.schedules.cosine"), ("flow", None, "diffx.schedules.linear"),
    ("ddpm", "linear", "diffx.schedules.linear"), ("flow", "cosine", "diffx.schedules.cosine")])
def test_schedule_default_follows_the_objective(objective, schedule, expect):
    overrides = [f"objective={objective}"] + ([f"schedule={schedule}"] if schedule else [])
    cfg = _compose("train", overrides)
    assert cfg.schedule._target_ == expect and cfg.schedule.family == objective


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "experiment"])
def test_experiment_overlays_compose(option):
    cfg = _compose("train", [f"+experiment={option}"])
    assert cfg.model._target_
