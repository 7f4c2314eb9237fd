"""GPU paths: the same code on CUDA, mixed precision included. Skipped without CUDA."""

import pytest

from conftest import compose_config
import torch

from diffx import checkpoint, grids, noise, samplers

pytestmark = pytest.mark.gpu


def _cfg(overrides):
    return compose_config("train", overrides)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_train_and_sample_on_cuda(tmp_path, precision):
    from diffx.train import train

    cfg = _cfg(["data.size=16", "data.n=64", f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=16",
                "train.steps=4", "train.log_every=2", f"train.mixed_precision={precision}", f"run_dir={tmp_path / 'run'}"])
    train(cfg)
    parts, ckpt = checkpoint.load(tmp_path / "run" / "model.safetensors", device="cuda")
    gens = noise.generators([0, 1])
    x = noise.randn((2, 3, 16, 16), gens, "cuda")
    denoise = samplers.make_denoiser(parts.model, parts.objective, {"label": torch.tensor([0, 1], device="cuda")},
                                     cfg_scale=2.0)
    out = samplers.dpmpp(denoise, parts.objective.schedule, x, grids.uniform(4))
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    # the start noise is drawn on the CPU per seed: the same on every device
    torch.testing.assert_close(x.cpu(), noise.randn((2, 3, 16, 16), noise.generators([0, 1])))


def test_fitted_solver_on_cuda_matches_cpu():
    """The learned solver's rollout and fit run with the model on CUDA (coefficients and times stay on the
    CPU in float64), and give the CPU's samples."""
    from analytic import AnalyticModel, two_point_mixture
    from conftest import make_objective

    from diffx.samplers import learned

    obj = make_objective("flow", "linear")
    base = learned.trace(samplers.unipc, obj.schedule, grids.uniform(5, obj.schedule))
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    outs = {}
    for dev in ("cpu", "cuda"):
        den = samplers.make_denoiser(AnalyticModel(obj, two_point_mixture).to(dev), obj)
        target = learned.reference(den, obj.schedule, z.to(dev), steps=20)
        fitted = learned.fit(lambda idx: den, base, z.to(dev), target, iters=5, batch=32)
        outs[dev] = fitted(den, obj.schedule, z.to(dev)).cpu()
        assert torch.isfinite(outs[dev]).all()
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-3, atol=1e-3)
