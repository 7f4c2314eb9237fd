"""Fused CPU kernels for the transformer blocks' element-wise chains, with eager PyTorch as the fallback.

Four chains, each one pass over memory forward and one backward (``fused_cpu.cpp`` has the formulas): the
adaLN modulated LayerNorm ``(x - mu) * rstd * (1 + scale) + shift`` (DiT), the gated residual
``x + gate * linear(y)`` (adaLN-Zero), the per-head RMSNorm of QK-norm (SD3 sec. 5.3.2), and the GELU of a
biased pre-activation (the MMDiT's MLP, the UNet's transformer feed-forward). Eager PyTorch spends one pass
per op on them (the LayerNorm, the modulation, and in the backward a multiply, a reduction and another
multiply per input); on a CPU in float32 those passes are most of a transformer step besides the matmuls
and the attention (README, "Training speed against diffusers").

The kernels are C++ built on first use with ``torch.utils.cpp_extension`` (the system's C++ compiler, and
ninja; about half a minute once per machine, then cached under ``~/.cache/diffx/kernels`` or
``DIFFX_KERNEL_CACHE``) with OpenMP, so they run on PyTorch's intra-op threads, for float32 and float64 CPU
tensors. Everything else (CUDA, bf16 under autocast, torch.compile, no compiler, ``DIFFX_CPU_KERNELS=0``)
takes the eager path, the same function to float round-off (tests/test_fused.py checks both against each
other).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_lock = threading.Lock()
_state: dict = {}


def kernels():
    """The built extension module, or None where it is switched off or cannot be built (warned once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


@contextlib.contextmanager
def eager():
    """Within it, every function here takes its eager path, as on a machine without the kernels
    (``scripts/bench_fused.py`` times the two side by side)."""
    saved = kernels()
    _state["module"] = None
    try:
        yield
    finally:
        _state["module"] = saved


def _build():
    if os.environ.get("DIFFX_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        source = Path(__file__).with_name("fused_cpu.cpp")
        # Built for this CPU (-march=native), Python and torch, so keyed by them: a home directory shared by a
        # cluster's unlike nodes must not hand one node's build to another (an illegal instruction, not an
        # error), nor one environment's to another's torch (cpp_extension's own check hashes only the sources).
        name = f"diffx_fused_cpu_{_build_tag()}"
        build = Path(os.environ.get("DIFFX_KERNEL_CACHE", "~/.cache/diffx/kernels")).expanduser() / name
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob(f"{name}*.so")):
            print(f"diffx: building the fused CPU kernels in {build} (once per machine, about 30 s)",
                  file=sys.stderr, flush=True)
        return load(name=name, sources=[str(source)], build_directory=str(build),
                    extra_cflags=["-O3", f"-march={_arch()}", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, an unknown ISA: eager PyTorch computes the same
        warnings.warn(f"diffx: fused CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "using eager PyTorch (set DIFFX_CPU_KERNELS=0 to skip the build)", stacklevel=3)
        return None


def _ninja_on_path() -> None:
    """The ninja that the ``ninja`` package installed, on PATH for cpp_extension (which runs ``ninja``) even
    when diffx runs from a virtual environment that is not activated."""
    try:
        import ninja
    except ImportError:
        return
    if shutil.which("ninja") is None:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _arch() -> str:
    """The -march the kernels are built for: this CPU's (native), or ``DIFFX_KERNEL_ARCH`` (e.g. x86-64-v3 for
    AVX2, x86-64 for SSE2 only: the tests build those too, so each vector width's code path is checked)."""
    return os.environ.get("DIFFX_KERNEL_ARCH", "native")


def _build_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags (Linux's /proc/cpuinfo; elsewhere the
    platform), the Python version and the torch version."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        text = "".join(sorted({ln for ln in info if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        text = platform.machine() + platform.processor()
    text += f"python {sys.version_info[:2]} torch {torch.__version__} march {_arch()}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _usable(*tensors: Tensor) -> bool:
    """CPU, float32/float64, outside autocast (whose casts the eager path does) and outside torch.compile (which
    fuses the eager formulas itself: train.compile=true), and the kernels built."""
    t = tensors[0]
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and all(u.dtype == t.dtype and u.device.type == "cpu" for u in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and kernels() is not None)


# ------------------------------------------------------------------------------------------- modulated norm
def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN: LayerNorm(x) * (1 + scale) + shift, x (B, N, D), shift and scale (B, D) per sample."""
    if x.dim() == 3 and _usable(x, shift, scale):
        return _ModulatedNorm.apply(x.contiguous(), shift.contiguous(), scale.contiguous(), eps)
    return torch.addcmul(shift[:, None], F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale[:, None])


class _ModulatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = kernels().modulated_norm_forward(x, shift, scale, eps)
        ctx.save_for_backward(x, mean, rstd, scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, scale = ctx.saved_tensors
        dx, dshift, dscale = kernels().modulated_norm_backward(dy.contiguous(), x, mean, rstd, scale)
        return dx, dshift, dscale, None


# ------------------------------------------------------------------------------------------- gated residual
def gated_residual(x: Tensor, gate: Tensor, linear: nn.Linear, inp: Tensor) -> Tensor:
    """adaLN-Zero's residual of a linear layer: x + gate * linear(inp), x (B, N, D), gate (B, D). On a CPU the
    bias-free matmul, then the bias, the gate and the residual in one pass, and the backward's gate and bias
    gradients in one pass too."""
    if x.dim() == 3 and _usable(x, gate, inp, linear.weight):
        h = F.linear(inp, linear.weight)
        bias = linear.bias if linear.bias is not None else h.new_zeros(h.shape[-1])
        return _Gated.apply(x, gate.contiguous(), h, bias)
    return torch.addcmul(x, gate[:, None], linear(inp))


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, h, bias):
        h = h.contiguous()
        ctx.save_for_backward(gate, h, bias)
        return kernels().gated_forward(x.contiguous(), gate, h, bias)

    @staticmethod
    def backward(ctx, dout):
        gate, h, bias = ctx.saved_tensors
        dh, dgate, dbias = kernels().gated_backward(dout.contiguous(), h, bias, gate)
        return dout, dgate, dh, dbias


# ------------------------------------------------------------------------------------------- RMSNorm
def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor | None:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim of a 4-D x with a contiguous last dim (any other
    strides, e.g. a projection's per-head view), or None where the kernels do not apply."""
    if x.dim() == 4 and x.stride(-1) == 1 and _usable(x, w):
        return _RMSNorm.apply(x, w.contiguous(), eps)
    return None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        y, r = kernels().rms_norm_forward(x, w, eps)
        ctx.save_for_backward(x, r, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, r, w = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx, dw = kernels().rms_norm_backward(dy, x, r, w, ctx.needs_input_grad[1])
        return dx, (dw if ctx.needs_input_grad[1] else None), None


# ------------------------------------------------------------------------------------------- bias + GELU
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """GELU(x W^T + b): the bias-free matmul, then the bias and the GELU (exact or tanh) in one pass, whose
    backward gives the pre-activation's and the bias's gradients in one pass too."""
    # The exact form only: with tanh's vectorised kernel this pass was slower than PyTorch's own GELU.
    if approximate == "none" and bias is not None and _usable(x, weight, bias):
        h = F.linear(x, weight)
        out = _BiasGelu.apply(h.reshape(-1, h.shape[-1]), bias, approximate == "tanh")
        return out.view(h.shape)
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, b, tanh):
        h = h.contiguous()
        ctx.save_for_backward(h, b)
        ctx.tanh = tanh
        return kernels().bias_gelu_forward(h, b, tanh)

    @staticmethod
    def backward(ctx, dg):
        h, b = ctx.saved_tensors
        dh, db = kernels().bias_gelu_backward(dg.contiguous(), h, b, ctx.tanh)
        return dh, db, None
