"""The fused CPU kernels (diffx/models/fused.py, fused_cpu.cpp) against the eager formulas they replace:
values and gradients in float64 to round-off, gradcheck, float32 to float32's error, odd widths (the vector
loops' scalar tails), strided per-head views, several threads, and the eager fallback (no kernels, autocast)."""

import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_all

from diffx.models import fused
from diffx.models.layers import _RMSNormFn
from diffx.models.mmdit import MMDiT

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def built():
    assert fused.kernels() is not None, "the fused CPU kernels did not build (a C++ compiler and ninja are needed)"


@pytest.fixture
def eager():
    """The eager path: as where the kernels cannot be built or DIFFX_CPU_KERNELS=0."""
    with fused.eager():
        yield


def _eager_modulated_norm(x, shift, scale, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _eager_rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _eager_linear_gelu(x, weight, bias, approximate="none"):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def _inputs(shapes, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def _same(fused_f, eager_f, shapes, dtype=F64, tol=1e-10, seed=0):
    """fused_f and eager_f on the same inputs: equal outputs and gradients to ``tol``."""
    ins = _inputs(shapes, dtype, seed)
    ref = [t.detach().clone().requires_grad_() for t in ins]
    out, want = fused_f(*ins), eager_f(*ref)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    got_g = torch.autograd.grad(out, ins, dy)
    want_g = torch.autograd.grad(want, ref, dy)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("B,N,D", [(3, 5, 48), (2, 7, 37), (1, 1, 3)])
def test_modulated_norm_equals_layer_norm_then_modulation(B, N, D):
    _same(fused.modulated_norm, _eager_modulated_norm, [(B, N, D), (B, D), (B, D)])


def _gated(x, gate, inp, weight, bias):
    """gated_residual through an nn.Linear holding (weight, bias), so their gradients flow to the test's leaves."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    del linear.weight, linear.bias
    linear.weight, linear.bias = weight, bias
    return fused.gated_residual(x, gate, linear, inp)


def _eager_gated(x, gate, inp, weight, bias):
    return x + gate[:, None] * F.linear(inp, weight, bias)


@pytest.mark.parametrize("B,N,D", [(3, 5, 48), (2, 7, 37)])
def test_gated_residual_equals_x_plus_gate_times_linear(B, N, D):
    _same(_gated, _eager_gated, [(B, N, D), (B, D), (B, N, 20), (D, 20), (D,)])
    _same(lambda x, g, i, w: _gated(x, g, i, w, None), lambda x, g, i, w: _eager_gated(x, g, i, w, None),
          [(B, N, D), (B, D), (B, N, 20), (D, 20)])


@pytest.mark.parametrize("layout", ["contiguous", "heads of a projection", "heads of a kv chunk"])
@pytest.mark.parametrize("Dh", [16, 10])
def test_rms_norm_equals_the_formula_on_strided_views(layout, Dh):
    B, H, N = 2, 3, 5

    def view(x):  # x (B, H, N, Dh) -> the same values in the layout the MMDiT gives the norm
        if layout == "contiguous":
            return x
        if layout == "heads of a projection":  # split_heads of a (B, N, H * Dh) output
            return x.transpose(1, 2).reshape(B, N, H * Dh).view(B, N, H, Dh).transpose(1, 2)
        kv = torch.cat([x.transpose(1, 2).reshape(B, N, H * Dh), torch.zeros(B, N, H * Dh, dtype=x.dtype)], -1)
        return kv[..., : H * Dh].view(B, N, H, Dh).transpose(1, 2)  # k of to_kv(h).chunk(2)

    _same(lambda x, w: fused.rms_norm(view(x), 1 + w, 1e-6), lambda x, w: _eager_rms(view(x), 1 + w),
          [(B, H, N, Dh), (Dh,)])
    assert fused.rms_norm(view(torch.randn(B, H, N, Dh, dtype=F64)), torch.ones(Dh, dtype=F64), 1e-6) is not None


@pytest.mark.parametrize("F_", [64, 37])
def test_linear_gelu_equals_linear_then_exact_gelu(F_):
    _same(fused.linear_gelu, _eager_linear_gelu, [(2, 5, 24), (F_, 24), (F_,)])


def test_gradcheck_of_each_kernel():
    for f, shapes in [
        (lambda x, s, c: fused.modulated_norm(x, s, c), [(2, 3, 19), (2, 19), (2, 19)]),
        (_gated, [(2, 3, 19), (2, 19), (2, 3, 5), (19, 5), (19,)]),
        (lambda x, w: fused.rms_norm(x, w, 1e-6), [(2, 2, 3, 19), (19,)]),
        (fused.linear_gelu, [(3, 7), (19, 7), (19,)]),
    ]:
        assert torch.autograd.gradcheck(f, tuple(_inputs(shapes, seed=3)))


def test_float32_within_float32_error_of_the_float64_formula():
    """In float32 the kernels (the GELU with its polynomial erf) are as close to the float64 formula as eager
    float32 is, within a small factor."""
    cases = [
        (lambda x, s, c: fused.modulated_norm(x, s, c), _eager_modulated_norm, [(4, 64, 96), (4, 96), (4, 96)]),
        (_gated, _eager_gated, [(4, 64, 96), (4, 96), (4, 64, 80), (96, 80), (96,)]),
        (lambda x, w: fused.rms_norm(x, w, 1e-6), _eager_rms, [(4, 3, 64, 32), (32,)]),
        (fused.linear_gelu, _eager_linear_gelu, [(4, 64, 96), (256, 96), (256,)]),
    ]
    for f, ref, shapes in cases:
        ins = _inputs(shapes, F64, seed=5)
        want = ref(*ins)
        dy = torch.randn_like(want)
        want_g = torch.autograd.grad(want, ins, dy)
        errs = []
        for g in (f, ref):
            x32 = [t.detach().float().requires_grad_() for t in ins]
            out = g(*x32)
            assert out.dtype == torch.float32
            grads = torch.autograd.grad(out, x32, dy.float())
            errs.append([(out.double() - want).abs().max().item()]
                        + [(a.double() - b).abs().max().item() for a, b in zip(grads, want_g)])
        for ours, eager32 in zip(*errs):
            assert ours <= 4 * eager32 + 1e-6, errs


def test_reductions_over_several_threads_equal_one_thread():
    """The per-sample and per-channel gradients reduced across threads (dw, db, dshift, dscale, dgate)."""
    shapes = {
        "norm": [(6, 33, 40), (6, 40), (6, 40)],
        "rms": [(6, 4, 33, 16), (16,)],
        "gelu": [(6, 33, 40), (48, 40), (48,)],
        "gated": [(6, 33, 40), (6, 40), (6, 33, 24), (40, 24), (40,)],
    }
    fns = {"norm": fused.modulated_norm, "rms": lambda x, w: fused.rms_norm(x, w, 1e-6), "gelu": fused.linear_gelu,
           "gated": _gated}
    threads = torch.get_num_threads()
    try:
        for name, f in fns.items():
            results = []
            for n in (1, 2):
                torch.set_num_threads(n)
                ins = _inputs(shapes[name], seed=7)
                out = f(*ins)
                results.append(torch.autograd.grad(out, ins, torch.ones_like(out)))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def _mmdit(seed=0):
    torch.manual_seed(seed)
    model = MMDiT(in_channels=4, image_size=8, text_dim=12, pooled_dim=12, width=48, depth=2, heads=3,
                  gelu_approximate="none")
    perturb_all(model, torch.Generator().manual_seed(seed))  # adaLN-Zero starts every gate at 0
    return model


def _mmdit_grads(model):
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.rand(3, generator=gen)
    cond = {"tokens": torch.randn(3, 5, 12, generator=gen), "mask": torch.tensor([[1, 1, 1, 0, 0]] * 3).bool(),
            "pooled": torch.randn(3, 12, generator=gen)}
    out = model(x, t, cond)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_output_and_grads(ours, eager):
    """(output, {name: grad}) with the kernels and without, to float32 round-off; each gradient relative to its
    own scale."""
    torch.testing.assert_close(ours[0], eager[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == eager[1].keys()
    for name in ours[1]:
        scale = eager[1][name].abs().max().item()
        torch.testing.assert_close(ours[1][name], eager[1][name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_mmdit_with_kernels_equals_mmdit_without():
    """The whole model, forward and every parameter's gradient, with and without the kernels (float32: the
    model embeds t in float32; the kernels' float64 equality is tested above)."""
    with_k = _mmdit_grads(_mmdit())
    with fused.eager():
        without = _mmdit_grads(_mmdit())
    _assert_same_output_and_grads(with_k, without)


def test_unet_with_kernels_equals_unet_without():
    """The UNet's transformer feed-forward (bias + GELU fused): output and gradients with and without."""
    from diffx.models.unet import UNet

    def grads():
        torch.manual_seed(0)
        model = UNet(in_channels=3, image_size=8, num_classes=4, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), heads=2)
        perturb_all(model, torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        out = model(torch.randn(2, 3, 8, 8, generator=gen), torch.rand(2, generator=gen), {"label": torch.tensor([0, 3])})
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with_k = grads()
    with fused.eager():
        without = grads()
    _assert_same_output_and_grads(with_k, without)


def test_kernels_are_used_on_cpu_float_and_not_under_autocast(monkeypatch):
    calls = []
    real = fused.kernels()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setitem(fused._state, "module", Spy())
    _mmdit_grads(_mmdit())
    assert {"modulated_norm_forward", "modulated_norm_backward", "gated_forward", "gated_backward", "rms_norm_forward",
            "rms_norm_backward", "bias_gelu_forward", "bias_gelu_backward"} <= set(calls)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _mmdit()(torch.randn(2, 4, 8, 8), torch.rand(2))
    assert torch.isfinite(out.float()).all() and not calls
    # torch.compile (train.compile=true) traces the eager formulas, to fuse them itself
    torch._dynamo.reset()
    compiled = torch.compile(_mmdit(), backend="aot_eager", fullgraph=True)
    compiled(torch.randn(2, 4, 8, 8), torch.rand(2)).square().mean().backward()
    assert not calls


def test_switched_off_or_unbuildable_kernels_fall_back_to_eager(monkeypatch):
    monkeypatch.setenv("DIFFX_CPU_KERNELS", "0")
    assert fused._build() is None
    monkeypatch.delenv("DIFFX_CPU_KERNELS")

    def no_compiler(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused._build() is None
    assert any("fused CPU kernels unavailable" in str(w.message) and "Ninja" in str(w.message) for w in caught)


def test_eager_path_gives_the_same_model_output(eager):
    """With no kernels every function still computes (the GPU's and bf16's path)."""
    x, s, c = _inputs([(2, 3, 8), (2, 8), (2, 8)])
    torch.testing.assert_close(fused.modulated_norm(x, s, c), _eager_modulated_norm(x, s, c))
    assert fused.rms_norm(torch.randn(1, 2, 3, 4), torch.ones(4), 1e-6) is None  # the caller's own path then
    out, _ = _mmdit_grads(_mmdit())
    assert torch.isfinite(out).all()


def test_rms_norm_module_matches_its_written_out_fallback():
    """layers.RMSNorm takes the kernel on a CPU float tensor; the same values as layers._RMSNormFn."""
    from diffx.models.layers import RMSNorm

    norm = RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(16, dtype=F64))
    x = torch.randn(2, 3, 5, 16, dtype=F64)
    torch.testing.assert_close(norm(x), _RMSNormFn.apply(x, norm.weight, norm.eps), rtol=1e-12, atol=1e-12)


def test_the_ninja_package_is_put_on_path_when_none_is_there(monkeypatch):
    """A virtual environment run without activation has the ninja package but not its binary on PATH."""
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    fused._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


def test_the_build_is_keyed_by_cpu_python_and_torch(monkeypatch):
    """A cached -march=native build must not be loaded by another CPU's node, Python or torch."""
    tag = fused._build_tag()
    assert len(tag) == 10 and tag == fused._build_tag()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert fused._build_tag() != tag


# Narrower vector units than this machine's, where the platform has named ones (ATen's AVX2 and generic paths).
NARROWER = {"x86_64": ["x86-64-v3", "x86-64"], "AMD64": ["x86-64-v3", "x86-64"], "aarch64": ["armv8-a"]}


@pytest.mark.slow
@pytest.mark.parametrize("arch", NARROWER.get(platform.machine(), ["native"]))
def test_the_kernels_built_for_narrower_vector_units_pass_these_tests(arch, tmp_path):
    """The vector width changes the kernels' code paths (on x86, ATen's AVX2 and generic Vectorized): build them
    for each (x86-64-v3: AVX2; x86-64: no AVX) and run this file's other tests against that build (~40 s each)."""
    env = dict(os.environ, DIFFX_KERNEL_ARCH=arch, DIFFX_KERNEL_CACHE=str(tmp_path), OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "failed" not in run.stdout
