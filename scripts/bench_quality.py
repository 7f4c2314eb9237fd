"""Time to quality: CPU-minutes of training until a text-to-image model on ``data=shapes`` draws what it
is told, diffx's recipe against a baseline written the way diffusers' example training scripts do it.

- **diffx**: ``diffx train +experiment=t2i_shapes`` itself (``diffx.train.train``, in this process),
  run in chunks of ``--every`` steps: each chunk resumes the run where the last one saved (diffx's resume
  is exact), so the curve is that of one straight run. Each chunk's start-up (data, parts, resume state,
  the probe loss at its end) counts as training time: a cost the straight run would not pay.
- **diffusers**: ``UNet2DConditionModel`` (SD 1.x layout: ResNet blocks, cross-attention to the text
  tokens) with ``DDPMScheduler`` (epsilon prediction, 1000 linear betas), a plain AdamW loop with the
  defaults of ``examples/text_to_image/train_text_to_image.py`` (lr 1e-4, weight decay 1e-2, constant
  rate, grad norm clipped at 1, no EMA) and its ``--proportion_empty_prompts 0.1`` for guidance. It
  reads the same text embeddings: diffx's tiny text encoder (``diffx.text.Tiny``), trained jointly
  with it as diffx trains it. Same data, batch and seed; its UNet is sized to the parameter count of
  diffx's MMDiT (both printed).

Every ``--every`` steps both are scored by diffx eval's reader (``diffx.evaluate.score``: the shapes
read back from the pixels) on one fixed prompt set (diffx eval's: ``--prompts`` attribute combinations
drawn by seed 0, template captions), at guidance ``--cfg`` with DPM-Solver++(2M), 30 uniform steps, on
each side (diffx's ``multistep.dpmpp``; diffusers' ``DPMSolverMultistepScheduler``). Only training counts
as CPU time (``time.process_time`` of this process around the training calls; run with
OMP_NUM_THREADS=1 for CPU-seconds at one thread). Each run stops at ``--cap-min`` CPU-minutes or at
``--stop`` exact match.

    OMP_NUM_THREADS=1 python scripts/bench_quality.py --runs diffx --out /tmp/q      # one curve each,
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --runs diffusers --out /tmp/q  # in parallel if you like
    python scripts/bench_quality.py --report --out /tmp/q --png docs/time_to_quality.png   # table + curve
    python scripts/bench_quality.py --smoke --out /tmp/smoke                          # tiny: does it run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffx import captions, checkpoint, holdout
from diffx.errors import DiffxError
from diffx.evaluate import draw, score
from diffx.generate import Request, generate

THRESHOLDS = (0.5, 0.8, 0.9, 0.95)
SAMPLING_STEPS = 30
# Tiny sizes for --smoke (and its test): 8x8 shapes, 2 steps a chunk, 4 prompts.
SMOKE_DIFFX = ["data.size=8", "data.n=64", "model.width=32", "model.depth=1", "model.heads=2", "model.patch_size=2",
               "text_encoder.width=32", "text_encoder.depth=1", "text_encoder.heads=2", "text_encoder.vocab_size=64",
               "train.batch_size=8", "train.warmup=0", "train.log_every=1"]


def compose(overrides: list[str]):
    """The real config tree ``conf/train.yaml`` composed with ``overrides``, as ``diffx train`` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from diffx.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return hydra_compose("train", overrides=overrides)


def prompt_set(data_cfg, n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """diffx eval's fixed prompt set for this data (split ``all``): ``n`` attribute combinations drawn
    by ``seed`` and their template captions."""
    pool = holdout.split("all", data_cfg.get("holdout"), list(data_cfg.shapes), list(data_cfg.colors),
                         int(data_cfg.get("seed", 0)))
    targets = draw(pool, n, seed)
    return targets, captions.captions(targets, "template", seed)


class Diffx:
    """``diffx train`` with ``overrides`` (``+experiment=t2i_shapes``), advanced in resumed chunks."""

    name = "diffx"

    def __init__(self, overrides: list[str], run_dir: Path):
        self.overrides, self.run_dir = overrides, run_dir
        self.cfg = compose(overrides + [f"run_dir={run_dir}"])
        from diffx.build import DataSpec, build
        from hydra.utils import instantiate

        self.parts = build(self.cfg, DataSpec.of(instantiate(self.cfg.data)))
        self.params = _count(self.parts.model.net), _count(self.parts.model)

    def train_to(self, step: int) -> None:
        from diffx.train import train

        train(compose(self.overrides + [f"run_dir={self.run_dir}", f"train.steps={step}", f"train.save_every={step}"]))

    def sample(self, prompts: list[str], scale: float, seed: int = 0) -> np.ndarray:
        from diffx import grids
        from diffx.samplers import multistep
        from diffx.samplers import plan as plans

        parts, _ = checkpoint.load(self.run_dir / "model.safetensors", "cpu")
        plan = plans.make(multistep.dpmpp, grids.uniform, SAMPLING_STEPS, parts.objective.schedule)
        seeds = [seed + i for i in range(len(prompts))]
        return generate(parts, plan, Request(seeds, prompts, None, scale), 64, "cpu")[0]


class Diffusers(torch.nn.Module):
    """The baseline: diffusers' ``UNet2DConditionModel`` reading diffx's tiny text encoder's tokens,
    trained as ``train_text_to_image.py`` trains (epsilon, ``DDPMScheduler``, AdamW, no EMA)."""

    name = "diffusers"

    def __init__(self, cfg, target_params: int, lr: float = 1e-4, seed: int = 0):
        super().__init__()
        from diffusers import DDPMScheduler
        from hydra.utils import instantiate

        from diffx import conditioning

        torch.manual_seed(seed)
        self.data = instantiate(cfg.data)
        encoder = instantiate(cfg.text_encoder)
        self.text_features = conditioning.Text(encoder)        # cached frozen stage: word ids and mask
        self.text = encoder.head()                               # trainable: jointly with the UNet
        self.unet = matched_unet(self.data.image_size, self.data.channels, encoder.dim, target_params)
        self.params = _count(self.unet), _count(self)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.batch_size, self.p_empty, self.step = int(cfg.train.batch_size), 0.1, 0
        loader = torch.utils.data.DataLoader(self.data.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(seed))
        self.batches = _forever(loader)
        self.rng = torch.Generator().manual_seed(seed + 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        text = self.text(self.text_features.encode(prompts))     # tokens (B, L, D), mask (B, L)
        return self.unet(x, timesteps, encoder_hidden_states=text["tokens"],
                         encoder_attention_mask=text["mask"]).sample

    def train_to(self, step: int) -> None:
        """The loop of ``train_text_to_image.py``: noise, random timesteps, ``add_noise``, MSE to the
        noise, backward, clip, AdamW step."""
        self.train()
        while self.step < step:
            batch = next(self.batches)
            x0 = batch["x"]                                      # (B, C, H, W) in [-1, 1]
            prompts = [c if r >= self.p_empty else "" for c, r in
                       zip(batch["caption"], torch.rand(len(x0), generator=self.rng).tolist())]
            noise = torch.randn(x0.shape, generator=self.rng)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), generator=self.rng)
            noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
            loss = F.mse_loss(self(noisy, timesteps, prompts).float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

    @torch.no_grad()
    def sample(self, prompts: list[str], scale: float, seed: int = 0, batch_size: int = 64) -> np.ndarray:
        """The pipeline's loop: ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) on the training
        betas, classifier-free guidance ``eps_u + scale (eps_c - eps_u)``."""
        from diffusers import DPMSolverMultistepScheduler

        self.eval()
        scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        out = []
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo: lo + batch_size]
            shape = (self.data.channels, self.data.image_size, self.data.image_size)
            x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + lo + i))
                             for i in range(len(chunk))]) * scheduler.init_noise_sigma
            scheduler.set_timesteps(SAMPLING_STEPS)
            for t in scheduler.timesteps:
                eps_c, eps_u = self(torch.cat([x, x]), t.expand(2 * len(x)), chunk + [""] * len(chunk)).chunk(2)
                x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)


def matched_unet(size: int, channels: int, text_dim: int, target: int):
    """An SD 1.x-layout ``UNet2DConditionModel`` (widths c, 2c, 2c; cross-attention at the two lower levels
    and the middle, as diffx's UNet; 4 heads; GroupNorm of 4 groups, so that c can step by 4) whose base
    width c gives the parameter count nearest ``target``."""
    from diffusers import UNet2DConditionModel

    def unet(c: int):
        return UNet2DConditionModel(
            sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
            block_out_channels=(c, 2 * c, 2 * c), norm_num_groups=4, cross_attention_dim=text_dim, attention_head_dim=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

    widths = range(4, 257, 4)
    with torch.device("meta"):  # the count grows with c: bisect to the first width at or past the target
        lo, hi = 0, len(widths) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if _count(unet(widths[mid])) < target else (lo, mid)
        best = min(widths[max(lo - 1, 0): lo + 1], key=lambda c: abs(_count(unet(c)) - target))
    return unet(best)


def race(run, every: int, cap_s: float, stop: float, targets, prompts, scale: float, log: Path,
         chunks: int | None = None) -> list[dict]:
    """Train ``run`` ``every`` steps at a time, scoring after each chunk, until ``stop`` exact match,
    ``cap_s`` CPU-seconds of training or ``chunks`` scores; one JSON line per score in ``log``."""
    rows, cpu, step = [], 0.0, 0
    while cpu < cap_s and (chunks is None or len(rows) < chunks):
        step += every
        start = time.process_time()
        run.train_to(step)
        cpu += time.process_time() - start
        result = score(run.sample(prompts, scale), targets)
        row = {"run": run.name, "step": step, "cpu_s": cpu, "exact": result["exact"], "malformed": result["malformed"],
               "cfg": scale, "prompts": len(prompts), "params": run.params[0], "params_total": run.params[1]}
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{run.name} step {step}: {cpu / 60:.2f} CPU-min, exact {100 * row['exact']:.1f}%", flush=True)
        if row["exact"] >= stop:
            break
    return rows


def first_reach(rows: list[dict], threshold: float) -> float | None:
    """CPU-minutes at the first score >= ``threshold``, or None."""
    return next((r["cpu_s"] / 60 for r in rows if r["exact"] >= threshold), None)


def table(curves: dict[str, list[dict]]) -> str:
    """Markdown: CPU-minutes to each threshold per run, and each other run's over diffx's."""
    names, others = list(curves), [n for n in curves if n != "diffx" and "diffx" in curves]
    lines = ["| exact match | " + " | ".join(f"{n} (CPU-min)" for n in names) + "".join(f" | {n} / diffx" for n in others)
             + " |", "|---" * (len(names) + len(others) + 1) + "|"]
    for th in THRESHOLDS:
        reached = {n: first_reach(curves[n], th) for n in names}
        last = {n: curves[n][-1]["cpu_s"] / 60 if curves[n] else 0.0 for n in names}
        cells = [f"{reached[n]:.1f}" if reached[n] is not None else f"not within {last[n]:.1f}" for n in names]
        for n in others:
            if not reached["diffx"]:
                cells.append("-")
            else:
                cells.append(f"{reached[n] / reached['diffx']:.1f}x" if reached[n] is not None
                             else f">= {last[n] / reached['diffx']:.1f}x")
        lines.append(f"| {100 * th:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """Exact match against training CPU-minutes, one line per run (``diffx.plots``, Pillow)."""
    from diffx import plots

    first = next(iter(curves.values()))[0]
    series = {f"{name} ({rows[0]['params'] / 1e6:.2f} M)": [(r["cpu_s"] / 60, 100 * r["exact"]) for r in rows]
              for name, rows in curves.items()}
    plots.save_curves(path, series, f"shapes text-to-image: {first['prompts']} prompts, cfg {first['cfg']:g}",
                      ylabel="exact match (%)", xlabel="training CPU-minutes (1 thread)", log_y=False)


def read_curves(out: Path) -> dict[str, list[dict]]:
    """Every ``curve_<name>.jsonl`` under ``out``, diffx's first (e.g. a baseline at another --lr, renamed)."""
    logs = sorted(out.glob("curve_*.jsonl"), key=lambda p: (p.stem != "curve_diffx", p.stem))
    curves = {log.stem[len("curve_"):]: [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
              for log in logs}
    if not curves:
        raise DiffxError(f"--out {out}: no curve_<run>.jsonl files; run with --runs first")
    return curves


def report(out: Path, png: Path) -> str:
    curves = read_curves(out)
    for name, rows in curves.items():
        print(f"{name}: {rows[0]['params'] / 1e6:.3f} M denoiser parameters ({rows[0]['params_total'] / 1e6:.3f} M "
              f"with the text encoder), {len(rows)} scores, last at step {rows[-1]['step']}")
    text = table(curves)
    print(text)
    plot(curves, png)
    (out / "table.md").write_text(text + "\n")
    print(f"wrote {png} and {out / 'table.md'}")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[], choices=["diffx", "diffusers"])
    parser.add_argument("--report", action="store_true", help="the table and the PNG from the curves under --out")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quality"))
    parser.add_argument("--png", type=Path, default=Path("docs/time_to_quality.png"))
    parser.add_argument("--every", type=int, default=250, help="training steps between scores")
    parser.add_argument("--cap-min", type=float, default=25.0, help="CPU-minutes of training per run at most")
    parser.add_argument("--stop", type=float, default=0.95, help="stop a run at this exact match")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4, help="the baseline's (train_text_to_image.py's default)")
    parser.add_argument("--chunks", type=int, default=None, help="scores per run at most")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 chunks of 2 steps: does it run")
    args = parser.parse_args(argv)
    overrides = ["+experiment=t2i_shapes"] + (SMOKE_DIFFX if args.smoke else [])
    if args.smoke:
        args.every, args.chunks, args.prompts = 2, 2, 4
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = compose(overrides)
    targets, prompts = prompt_set(cfg.data, args.prompts)
    ours = Diffx(overrides, args.out / "diffx_run") if args.runs else None
    for name in args.runs:
        run = ours if name == "diffx" else Diffusers(cfg, ours.params[0], args.lr)
        print(f"{name}: {run.params[0] / 1e6:.3f} M denoiser parameters, {run.params[1] / 1e6:.3f} M with the text "
              f"encoder (diffx's: {ours.params[0] / 1e6:.3f} M, {ours.params[1] / 1e6:.3f} M)", flush=True)
        race(run, args.every, args.cap_min * 60, args.stop, targets, prompts, args.cfg, args.out / f"curve_{name}.jsonl",
             args.chunks)
    if args.report or args.smoke:
        report(args.out, args.png if not args.smoke else args.out / "time_to_quality.png")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
