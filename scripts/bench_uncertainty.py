"""Closed-form last-layer predictive vs Monte Carlo (BayesDiff's ``n_samples=100``), and the propagated
variance of whole sampling runs vs Monte Carlo over whole runs with shared weight draws.

    OMP_NUM_THREADS=1 python scripts/bench_uncertainty.py --ckpt runs/<run>/model.safetensors   # fit-laplace first
    OMP_NUM_THREADS=1 python scripts/bench_uncertainty.py --ckpt ... --filter --seeds 5            # the README question

1. ``head``: on the model's real output layer at its real feature size (the checkpoint's, and the
   shipped ``model=unet`` / ``model=mmdit`` sizes at 32x32 with random weights, a random-curvature
   posterior: the timing and the error do not depend on training), both methods given the same
   features: time per call (median of repeats) and the RMS relative error of MC-100's variance
   against the exact one (expected sqrt(2/99) = 0.142).
2. ``runs``: ``diffx.uncertainty.propagate`` vs ``mc.run_moments`` over whole sampling runs (``--runs``
   draws) on the checkpoint: times, the per-pixel variance ratio and correlations, per-image score
   correlation.
3. ``--filter``: does dropping the most uncertain 10% raise the class accuracy of the rest (diffx eval's
   reader) more than dropping 10% at random? Over ``--seeds`` seeds of ``--n`` images each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from diffx import checkpoint, noise
from diffx import shapes as shape_rules
from diffx.evaluate import score
from diffx.generate import start_noise
from diffx.grids import uniform
from diffx.images import to_uint8
from diffx.models.mmdit import MMDiT
from diffx.models.unet import UNet
from diffx.samplers import plan as plans
from diffx.samplers.multistep import dpmpp
from diffx.samplers.single import ddim
from diffx.uncertainty import laplace, mc, predictive, propagate
from diffx.vae import sha256


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def random_posterior(head, structure: str) -> laplace.Posterior:
    k = laplace.head_params(head).shape[1]
    u = torch.randn(2 * k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = laplace.Curvature(u.T @ u, 1.0, 1, 0.0, head.weight.shape[0], 1.0, 1)
    return laplace.Posterior.from_curvature(c, structure, 1.0, 1.0, "bench")


def bench_head(name: str, model, posterior, x, t, cond, n: int, repeats: int) -> None:
    with torch.no_grad():
        f = model.features(x, t, cond)
        head = model.head
        gen = torch.Generator().manual_seed(0)
        t_cf, exact = timed(lambda: predictive.head_variance(posterior, head, f), repeats)
        t_mc, (_, var) = timed(lambda: mc.head_moments(posterior, head, f, n, gen), max(1, repeats // 5))
    rel = ((var / exact - 1) ** 2).mean().sqrt()
    print(f"| {name} | {posterior.structure} | {list(f.shape)} | {type(head).__name__}{list(head.weight.shape)} | "
          f"{1e3 * t_cf:.2f} ms | {1e3 * t_mc:.1f} ms | {t_mc / t_cf:.0f}x | {float(rel):.3f} |")


def built(model_cfg: str, size: int, cond: bool):
    """The shipped ``model=unet`` / ``model=mmdit`` sizes (conf/model/*.yaml, written out here so that the
    script does not depend on keys still being added to them), random weights."""
    kinds = {"unet": lambda: UNet(3, size, channels=32, channel_mult=(1, 2, 2), attn_resolutions=(8, 4)),
             "mmdit": lambda: MMDiT(3, size, width=128, depth=4, heads=4, patch_size=2)}
    model = kinds[model_cfg]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def run_comparison(parts, posterior, batch: int, runs: int, steps: int, cfg_scale: float) -> None:
    seeds = list(range(batch))
    labels = [random.Random(s).randrange(parts.spec.num_classes) for s in seeds] if parts.spec.num_classes else [None] * batch
    z = start_noise(parts, noise.generators(seeds), "cpu")
    cond, uncond = parts.condition.encode(labels), parts.condition.null(batch)
    probe = posterior.sample(1, parts.model.head.weight.shape[0], torch.Generator().manual_seed(0))[0]
    print(f"\n| sampler | variant | propagate | MC-{runs} runs | median var ratio | RMS log10 ratio | pixel corr | "
          "image-score corr | zero-var pixels (MC / prop.) |\n|---|---|---|---|---|---|---|---|---|")
    for name, sampler in (("ddim", ddim), ("dpmpp", dpmpp)):
        plan = plans.make(sampler, uniform, steps, parts.objective.schedule)
        with torch.no_grad():
            t0 = time.perf_counter()
            _, mv = mc.run_moments(parts, plan, labels, None, cfg_scale, z, posterior, runs, chunk=50,
                                   generator=torch.Generator().manual_seed(1))
            t_mc = time.perf_counter() - t0
        for variant, p in (("kappa (default)", probe), ("features frozen", None)):
            t0 = time.perf_counter()
            with torch.no_grad():
                denoise = propagate.TangentDenoiser(parts.model, parts.objective, cond, uncond, cfg_scale,
                                                    parts.latent.x0_range, probe=p)
                _, v = propagate.moments(parts.model, posterior, propagate.run(plan, parts.objective.schedule, denoise, z),
                                         parts.latent.x0_range)
            t_p = time.perf_counter() - t0
            moving = (mv > 0).flatten()  # pixels clipped in every run have no variance: left out of the ratio
            ratio = (v.flatten() / mv.flatten().clamp(min=1e-30))[moving]
            logr = torch.log10(ratio.clamp(min=1e-30))
            pix = torch.corrcoef(torch.stack([v.flatten(), mv.flatten()]))[0, 1]
            img = torch.corrcoef(torch.stack([v.flatten(1).mean(1), mv.flatten(1).mean(1)]))[0, 1]
            print(f"| {name} {steps} steps cfg={cfg_scale:g} | {variant} | {t_p:.1f} s | {t_mc:.0f} s | "
                  f"{float(ratio.median()):.2f} | {float(logr.pow(2).mean().sqrt()):.2f} | {float(pix):.2f} | {float(img):.2f} | "
                  f"{float((mv == 0).double().mean()):.1%} / {float((v == 0).double().mean()):.1%} |")


def filter_question(parts, data: dict, posterior, n: int, seeds: int, steps: int, cfg_scale: float, method: str,
                    runs: int) -> None:
    """Class accuracy (shape and colour read back) of all, of the 90% least uncertain, of a random 90%."""
    shapes, colors = shape_rules.check(data.get("shapes", shape_rules.SHAPES), data.get("colors", shape_rules.COLORS))
    plan = plans.make(dpmpp, uniform, steps, parts.objective.schedule)
    probe = posterior.sample(1, parts.model.head.weight.shape[0], torch.Generator().manual_seed(0))[0]
    rows = []
    for s in range(seeds):
        seed_list = list(range(s * n, (s + 1) * n))
        labels = [random.Random(k).randrange(parts.spec.num_classes) for k in seed_list]
        targets = [dict(zip(("color", "shape"), parts.spec.class_names[k].split())) for k in labels]
        z = start_noise(parts, noise.generators(seed_list), "cpu")
        cond, uncond = parts.condition.encode(labels), parts.condition.null(n)
        with torch.no_grad():
            if method == "mc":
                x0, var = mc.run_moments(parts, plan, labels, None, cfg_scale, z, posterior, runs, chunk=50,
                                         generator=torch.Generator().manual_seed(s))
            else:
                denoise = propagate.TangentDenoiser(parts.model, parts.objective, cond, uncond, cfg_scale,
                                                    parts.latent.x0_range, probe=probe)
                x0, var = propagate.moments(parts.model, posterior, propagate.run(plan, parts.objective.schedule, denoise, z),
                                            parts.latent.x0_range)
        images = to_uint8(parts.latent.decode(x0))
        right = torch.tensor([r["shape"] == t["shape"] and r["color"] == t["color"]
                              for r, t in zip(score(images, targets, ("shape", "color"), shapes, colors)["reads"], targets)],
                             dtype=torch.float64)
        drop = round(0.1 * n)
        keep_unc = torch.argsort(var.flatten(1).mean(1), descending=True)[drop:]
        rand = [right[torch.randperm(n, generator=torch.Generator().manual_seed(1000 * s + r))[drop:]].mean()
                for r in range(20)]
        rows.append((float(right.mean()), float(right[keep_unc].mean()), float(torch.stack(rand).mean())))
        print(f"seed block {s}: all {rows[-1][0]:.3f}  drop 10% most uncertain {rows[-1][1]:.3f}  "
              f"drop 10% at random (mean of 20) {rows[-1][2]:.3f}")
    gain_u = [u - a for a, u, _ in rows]
    gain_r = [r - a for a, _, r in rows]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
    print(f"\n{method}, {seeds} x {n} images, {steps} dpmpp steps, cfg={cfg_scale:g}: exact-class accuracy gain over all "
          f"images: uncertainty filter {statistics.mean(gain_u):+.4f} (sd {sd(gain_u):.4f}), "
          f"random filter {statistics.mean(gain_r):+.4f} (sd {sd(gain_r):.4f})")


def head_table(args, parts, posterior) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); head level, both given the same features, "
          f"MC-{args.samples}\n\n| model | structure | features | head | closed form | MC-{args.samples} | speed-up | "
          "MC RMS rel. error |\n|---|---|---|---|---|---|---|---|")
    b = args.batch
    x = torch.randn(b, *parts.x0_shape)
    t = torch.rand(b)
    cond = parts.condition.encode([random.Random(i).randrange(max(parts.spec.num_classes, 1)) for i in range(b)]) \
        if parts.spec.num_classes else None
    bench_head(f"{args.ckpt.split('/')[-2]} (trained)", parts.model, posterior, x, t, cond, args.samples, args.repeats)
    for cfg_name, size in (("unet", 32), ("mmdit", 32)):
        model = built(cfg_name, size, cond=False)
        for structure in laplace.STRUCTURES:
            bench_head(f"model={cfg_name} {size}x{size}", model, random_posterior(model.head, structure),
                       torch.randn(b, 3, size, size), torch.rand(b), None, args.samples, args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--laplace", default=None, help="default: laplace.safetensors beside the checkpoint")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--runs", type=int, default=100, help="MC draws over whole sampling runs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--skip-runs", action="store_true")
    ap.add_argument("--skip-head", action="store_true")
    ap.add_argument("--filter", action="store_true", help="the README question instead of the benchmark")
    ap.add_argument("--method", default="laplace", choices=["laplace", "mc"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)

    parts, ckpt = checkpoint.load(args.ckpt, "cpu")
    path = args.laplace or str(args.ckpt).rsplit("/", 1)[0] + "/laplace.safetensors"
    posterior = laplace.load(path, sha256(args.ckpt), args.ckpt, parts.model.head)
    if args.filter:
        filter_question(parts, ckpt.parts.get("data", {}), posterior, args.n, args.seeds, args.steps, args.cfg, args.method, args.runs)
        return

    if not args.skip_head:
        head_table(args, parts, posterior)
    if not args.skip_runs:
        run_comparison(parts, posterior, args.batch, args.runs, args.steps, args.cfg)


if __name__ == "__main__":
    main()
