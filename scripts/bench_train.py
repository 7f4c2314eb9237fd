"""Training-step speed: diffx's UNet and MMDiT against diffusers' UNet2DModel and SD3Transformer2DModel
built at matched sizes (same widths, depths, heads, patch, tokens, batch; parameter counts printed).

One step = forward, MSE to a fixed random target, backward, fused AdamW step, the same for both sides.
Both models of a pair run in one process, alternating for ``--rounds`` rounds of ``--steps`` timed steps
each (after ``--warmup`` steps), so that load drift on a shared machine hits both alike; reported: the
median ratio of images/s (diffx / diffusers) with its min-max over rounds, the achieved GFLOP/s of each
(FLOPs of one step counted once with ``torch.utils.flop_counter``) and that as a fraction of a matmul
peak measured in the same run (MFU). The same for one sampling call (forward, no grad). On CUDA the
models run in bf16 autocast; on the CPU in float32, or with ``--bf16`` in bf16 autocast too. Both share
glibc's allocator setting, freed memory kept for reuse (``train.keep_freed_memory``; ``--default-malloc``:
glibc's default, whose page faults vary by step).

    OMP_NUM_THREADS=2 python scripts/bench_train.py                   # both pairs, 7 rounds
    python scripts/bench_train.py --pairs unet --rounds 3 --steps 3   # quicker
    python scripts/bench_train.py --smoke                             # tiny sizes: does it run
    python scripts/bench_train.py --pairs mmdit --profile --batch 16  # where a step's time goes, per op
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffx import allocator
from diffx.models.mmdit import MMDiT
from diffx.models.unet import UNet
from diffx.models.upsample import Upsample


def unet_pair(size: int, width: int, smoke: bool, channels_last: bool = True, upsample_interpolate: bool = False):
    """diffx's UNet (labels) vs UNet2DModel (class embeddings), widths (w, 2w, 2w), attention at the two
    lower levels, one ResBlock per level. diffx's UNet as its config builds it (channels_last, the
    default of conf/model/unet.yaml); ``--diffx-nchw`` / ``--diffusers-nhwc`` show the other layouts,
    ``--diffx-upsample-interpolate`` diffx's upsampling computed as diffusers does it (interpolate, then the
    3x3 conv) instead of as one 2x2 conv on the low-resolution map (``diffx.models.upsample``)."""
    from diffusers import UNet2DModel

    w = 16 if smoke else width
    ours = UNet(in_channels=3, image_size=size, num_classes=10, channels=w, channel_mult=(1, 2, 2), num_res_blocks=1,
                attn_resolutions=(size // 2, size // 4), heads=4, channels_last=channels_last)
    if upsample_interpolate:
        for m in ours.modules():
            if isinstance(m, Upsample):  # the same weights, the textbook computation
                m.forward = m.reference
    theirs = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                         block_out_channels=(w, 2 * w, 2 * w), norm_num_groups=8, attention_head_dim=2 * w // 4,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10)

    def inputs(b, device):
        x, t = torch.randn(b, 3, size, size, device=device), torch.rand(b, device=device)
        label = torch.randint(10, (b,), device=device)
        return x, (lambda: ours(x, t, {"label": label})), (lambda: theirs(x, t * 999, class_labels=label).sample)

    return ours, theirs, inputs


def mmdit_pair(size: int, width: int, smoke: bool, gelu_approximate: str = "none"):
    """diffx's MMDiT (text tokens) vs SD3Transformer2DModel: 4-channel latents, patch 2, ``width`` with
    heads of 64, depth 6, 16 text tokens of width 256, a pooled vector of 256. diffx's MMDiT as its config
    builds it (exact GELU, ``model.gelu_approximate=none``); ``--diffx-gelu-tanh`` gives it SD3's."""
    from diffusers import SD3Transformer2DModel

    w, depth, heads = (64, 1, 1) if smoke else (width, 6, width // 64)
    text, pooled, tokens = 256, 256, 16
    ours = MMDiT(in_channels=4, image_size=size, text_dim=text, pooled_dim=pooled, width=w, depth=depth, heads=heads,
                 patch_size=2, gelu_approximate=gelu_approximate)
    theirs = SD3Transformer2DModel(sample_size=size, patch_size=2, in_channels=4, out_channels=4, num_layers=depth,
                                   attention_head_dim=w // heads, num_attention_heads=heads, joint_attention_dim=text,
                                   caption_projection_dim=w, pooled_projection_dim=pooled, pos_embed_max_size=size // 2,
                                   qk_norm="rms_norm")  # diffx's MMDiT has QK-norm (SD3 sec. 5.3.2, SD3.5)

    def inputs(b, device):
        x, t = torch.randn(b, 4, size, size, device=device), torch.rand(b, device=device)
        ctx, pool = torch.randn(b, tokens, text, device=device), torch.randn(b, pooled, device=device)
        cond = {"tokens": ctx, "mask": torch.ones(b, tokens, dtype=torch.bool, device=device), "pooled": pool}
        return x, (lambda: ours(x, t, cond)), (lambda: theirs(x, ctx, pool, t * 1000).sample)

    return ours, theirs, inputs


PAIRS = {"unet": (unet_pair, 32, 64), "mmdit": (mmdit_pair, 32, 384)}  # name -> (builder, image side, width)


def _pair(name: str, args):
    """The named pair at its benchmark size, diffx's UNet in the layout ``--diffx-nchw`` and with the upsampling
    ``--diffx-upsample-interpolate`` ask for, its MMDiT with the GELU ``--diffx-gelu-tanh`` asks for."""
    build, size, width = PAIRS[name]
    if name == "unet":
        options = {"channels_last": not args.diffx_nchw, "upsample_interpolate": args.diffx_upsample_interpolate}
    else:
        options = {"gelu_approximate": "tanh" if args.diffx_gelu_tanh else "none"}
    return build(size, width, args.smoke, **options)


def _step_fn(model, forward, x, train: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if train else None
    target = torch.randn_like(x)

    def step():
        if not train:
            with torch.no_grad():
                return forward()
        loss = F.mse_loss(forward().float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _time(step, n: int, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - start) / n


def matmul_peak(device, dtype, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul, the best of ``reps``: the MFU denominator."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = min(_time(lambda: a @ b, 3, device) for _ in range(reps))
    return 2 * n ** 3 / best


def compare(name: str, args, device, autocast) -> None:
    size = PAIRS[name][1]
    ours, theirs, inputs = _pair(name, args)
    if args.diffusers_nhwc:
        theirs = theirs.to(memory_format=torch.channels_last)
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    x, f_ours, f_theirs = inputs(args.batch, device)
    params = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    for mode, train in (("train step", True), ("sampling call", False)):
        steps = [_step_fn(m, f, x, train) for m, f in ((ours, f_ours), (theirs, f_theirs))]
        with autocast():
            flops = [_flops(s) for s in steps]
            for s in steps:
                _time(s, args.warmup, device)
            rounds = [[_time(s, args.steps, device) for s in steps] for _ in range(args.rounds)]  # alternating
        ratios = [t[1] / t[0] for t in rounds]  # diffx images/s over diffusers'
        secs = [statistics.median(t[k] for t in rounds) for k in (0, 1)]
        gflops = [f / s / 1e9 for f, s in zip(flops, secs)]
        print(f"{name} {mode} ({size}x{size}, batch {args.batch}): diffx {params[0] / 1e6:.2f} M params, "
              f"{flops[0] / 1e9:.2f} GFLOP, {args.batch / secs[0]:.1f} img/s, {gflops[0]:.1f} GFLOP/s "
              f"({100 * gflops[0] / args.peak:.1f}% of peak) | diffusers {params[1] / 1e6:.2f} M, {flops[1] / 1e9:.2f} GFLOP, "
              f"{args.batch / secs[1]:.1f} img/s, {gflops[1]:.1f} GFLOP/s ({100 * gflops[1] / args.peak:.1f}%) | "
              f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
              f"{args.rounds} rounds)", flush=True)


def profile(name: str, args, device, autocast, top: int = 32) -> None:
    """``--profile``: torch.profiler's self CPU time per op of a training step of each model, side by side
    (the mean over ``--rounds`` steps each, the two models alternating after 2 warm-up steps, so that load
    drift hits both alike), the ops where either side spends most first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ours, theirs, inputs = _pair(name, args)
    x, f_ours, f_theirs = inputs(args.batch, device)
    steps = [_step_fn(m.to(device).train(), f, x, True) for m, f in ((ours, f_ours), (theirs, f_theirs))]
    per_op = [{}, {}]
    with autocast():
        for step in steps:
            _time(step, 2, device)
        for _ in range(args.rounds):
            for step, ops in zip(steps, per_op):
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    _time(step, 1, device)
                for e in prof.key_averages():
                    t, n = ops.get(e.key, (0.0, 0))
                    ops[e.key] = (t + e.self_cpu_time_total / 1e3 / args.rounds, n + e.count / args.rounds)
    keys = sorted(set(per_op[0]) | set(per_op[1]), key=lambda k: -max(p.get(k, (0, 0))[0] for p in per_op))
    print(f"{name} train step, self CPU ms per step (calls): {'diffx':>18s} {'diffusers':>18s}")
    for k in keys[:top]:
        (a, n), (b, m) = per_op[0].get(k, (0, 0)), per_op[1].get(k, (0, 0))
        print(f"  {k[:58]:58s} {a:9.1f} ({n:4.0f}) {b:9.1f} ({m:4.0f})")
    print(f"  {'total':58s} {sum(v[0] for v in per_op[0].values()):9.1f}        "
          f"{sum(v[0] for v in per_op[1].values()):9.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny models, to check that it runs")
    parser.add_argument("--profile", action="store_true", help="per-op profile of one training step instead")
    parser.add_argument("--diffx-nchw", action="store_true", help="diffx's UNet with model.channels_last=false")
    parser.add_argument("--diffx-upsample-interpolate", action="store_true",
                        help="diffx's UNet upsampling as interpolate + 3x3 conv (the computation it replaced)")
    parser.add_argument("--diffx-gelu-tanh", action="store_true",
                        help="diffx's MMDiT with SD3's tanh GELU (model.gelu_approximate=tanh)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (by default both models share train.keep_freed_memory's "
                             "setting, so page faults, which vary from step to step, do not decide the ratio)")
    parser.add_argument("--bf16", action="store_true",
                        help="on the CPU too, both models in bf16 autocast (train.mixed_precision=bf16; the matmul "
                             "peak is then bf16's: on a CPU with AMX, several times float32's)")
    parser.add_argument("--diffusers-nhwc", action="store_true", help="diffusers' models in channels_last too")
    args = parser.parse_args()
    kept = not args.default_malloc and allocator.keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" or args.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    args.peak = matmul_peak(device, dtype) / 1e9
    print(f"device {device}, {dtype}, {torch.get_num_threads()} threads; matmul peak {args.peak:.1f} GFLOP/s; "
          f"freed host memory {'kept for reuse' if kept else 'returned (glibc default)'}")
    for name in args.pairs:
        (profile if args.profile else compare)(name, args, device, autocast)


if __name__ == "__main__":
    main()
