"""GPU paths: the same code on CUDA, mixed precision included. Skipped without CUDA."""

import pytest

from conftest import compose_config, perturb_all
import torch

from diffx import checkpoint, grids, noise, samplers

pytestmark = pytest.mark.gpu


def _cfg(overrides):
    return compose_config("train", overrides)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process and refuses another mixed precision once it is set:
    forget it before and after each test that picks a precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_train_and_sample_on_cuda(tmp_path, precision, fresh_accelerate_state):
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


@pytest.mark.parametrize("model", ["unet", "mmdit"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps(tmp_path, precision, model, fresh_accelerate_state):
    """Training steps under autocast (fp16 with Accelerate's loss scaler), with gradient accumulation and
    activation checkpointing on: finite losses, float32 weights, and a run that resumes."""
    import json

    from safetensors.torch import load_file

    from diffx.train import train

    common = [f"model={model}", "data.size=16", "data.n=64", f"data.cache_dir={tmp_path / 'cache'}",
              "train.batch_size=8", "train.grad_accum=2", "model.checkpointing=true", "train.log_every=1",
              "train.save_every=3", f"train.mixed_precision={precision}", f"run_dir={tmp_path / 'run'}"]
    train(_cfg(common + ["train.steps=3"]))
    train(_cfg(common + ["train.steps=6", f"resume={tmp_path / 'run'}"]))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["loss"] < 10 for r in log)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_fp16_steps_the_loss_scaler_skips_are_not_a_divergence(tmp_path, monkeypatch, fresh_accelerate_state):
    """fp16's loss scaler skips each step whose scaled gradients overflow and halves its scale: started
    far too high (2^32), the first steps are skipped. Their inf gradient norm must not stop the run as
    a divergence (NaN check): it is logged as 0, and training goes on once the scale fits."""
    import json

    from diffx.train import train

    init = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "init_scale": 2.0 ** 32}))
    train(_cfg(["data.size=16", "data.n=64", f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=8",
                "train.steps=40", "train.log_every=1", "train.mixed_precision=fp16", f"run_dir={tmp_path / 'run'}"]))
    norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert norms[0] == 0 and norms[-1] > 0 and all(n >= 0 and n < float("inf") for n in norms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upsample_on_cuda_matches_interpolate_then_conv(dtype):
    """``diffx.models.upsample``'s phase conv and interleave on CUDA (cuDNN, both memory orders)."""
    import torch.nn.functional as F

    from diffx.models.upsample import Upsample

    gen = torch.Generator().manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        layer = Upsample(16).cuda().to(memory_format=layout)
        x = torch.randn(2, 16, 8, 8, generator=gen).cuda().contiguous(memory_format=layout).requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            ours, ref = layer(x), layer.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=tol * ref.abs().max().item())
        g = torch.randn(ours.shape, generator=gen).cuda()
        got, want = (torch.autograd.grad(y, (x, layer.conv.weight), g.to(y.dtype)) for y in (ours, ref))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol * b.abs().max().item())


def test_precision_bf16_sampling_on_cuda():
    """``precision=bf16``'s autocast wrapper on CUDA: float32 out, close to the float32 network's."""
    from diffx import precision
    from diffx.build import Parts
    from diffx.models.unet import UNet

    model = UNet(3, 8, num_classes=3, channels=8, channel_mult=(1, 2), attn_resolutions=(4,)).eval()
    perturb_all(model, torch.Generator().manual_seed(0))
    model.cuda()
    with torch.no_grad():
        x, t = torch.randn(4, 3, 8, 8, device="cuda"), torch.rand(4, device="cuda")
        cond = {"label": torch.tensor([0, 1, 2, -1], device="cuda")}
        want = model(x, t, cond)
        got = precision.apply(Parts(model, None, None), "bf16", torch.device("cuda")).model(x, t, cond)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())


def test_mmdit_on_cuda_takes_the_eager_path_and_matches_the_cpu_kernels():
    """On CUDA the fused CPU kernels are not called; the model's output and gradients there equal the CPU's
    (which runs the kernels) to float32 round-off."""
    from diffx.models import fused
    from diffx.models.mmdit import MMDiT

    torch.manual_seed(0)
    model = MMDiT(in_channels=4, image_size=8, text_dim=12, pooled_dim=12, width=48, depth=2, heads=3,
                  gelu_approximate="none")
    perturb_all(model, torch.Generator().manual_seed(0))
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    cond = {"tokens": torch.randn(3, 5, 12), "mask": torch.ones(3, 5, dtype=torch.bool), "pooled": torch.randn(3, 12)}
    results = []
    for device in ("cpu", "cuda"):
        m = model.to(device)
        m.zero_grad()
        out = m(x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()})
        out.square().mean().backward()
        results.append((out.cpu(), [p.grad.cpu() for p in m.parameters()]))
    assert fused.kernels() is not None
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
