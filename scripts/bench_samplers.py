"""Sampler accuracy per network call: diffx against diffusers and k-diffusion on an exact model.

The data is a Gaussian mixture, so the denoiser is exact (the closed-form posterior mean) and every
sampler integrates the same probability-flow ODE from the same start noise. The reference endpoint
is a tight scipy DOP853 solve of that ODE in the variance-preserving angle ``phi = atan(sigma/alpha)``,
where it is smooth from pure noise (phi = pi/2) to data (phi = 0), cached under ``/tmp/diffx_bench_refs``.
Reported: the RMS endpoint error against it (over all samples and coordinates) per number of network
evaluations (NFE), and in the summary also the median per-sample error, since on multi-modal data the
RMS is dominated by the few samples whose trajectory ends in another mode.

Every sampler sees the model at the exact (alpha, sigma) it asks for: diffusers' schedulers at their
own internal sigma (so the integer rounding of timesteps that some do costs them nothing),
k-diffusion's at the sigma it passes. A sampler that starts short of t = 1 is scored against the ODE
solution from its own start. Samplers marked * are stochastic (scored against the same ODE endpoint,
for reference only); NFE in parentheses where a sampler cannot hit the budget exactly.

    python scripts/bench_samplers.py                # the 8-D table, ~17 minutes on one core (fits included)
    python scripts/bench_samplers.py --learned-nfe  # without the fitted solvers, ~4 minutes
    python scripts/bench_samplers.py --defaults --dim 64 --seeds 0 1 2 3   # sampler=auto's table (README)
    python scripts/bench_samplers.py --nfe 10 --cases flow-linear --all --std 0.2
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import math
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from diffx import grids, samplers, schedules
from diffx.errors import DiffxError
from diffx.samplers import auto, calibration, learned
from diffx.objectives import DDPM, Flow
from diffx.time_sampling import uniform as uniform_t

N_TRAIN = 1000


class GaussianMixture:
    """``x0 ~ sum_k w_k N(mu_k, c^2 I)``; ``denoise(x, alpha, sigma)`` is the exact posterior mean."""

    def __init__(self, dim=8, k=8, std=0.05, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(k, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8  # (K, D), data in ~[-1, 1]
        self.logw = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64) * 0.5, 0)
        self.c2 = std**2

    def denoise(self, x, alpha, sigma):
        """(B, D) x_t -> (x0_hat, noise_hat); x_t | component k ~ N(alpha mu_k, (alpha^2 c^2 + sigma^2) I)."""
        var = alpha**2 * self.c2 + sigma**2
        d = x[:, None, :] - alpha * self.mu  # (B, K, D)
        resp = torch.softmax(self.logw - (d**2).sum(-1) / (2 * var), dim=1)  # (B, K)
        mean = resp @ self.mu
        x0 = mean + (alpha * self.c2 / var) * (x - alpha * mean)
        noise = (x - alpha * x0) / sigma if sigma > 0 else torch.zeros_like(x)
        return x0, noise


REF_CACHE = Path("/tmp/diffx_bench_refs")  # DOP853 endpoints, keyed by the mixture, the noises and phi0


def reference(gmm, x_vp, phi0, rtol=1e-10, chunk=2048):
    """Endpoint of the PF-ODE ``dx/dphi = -sin(phi) x0_hat + cos(phi) noise_hat`` from phi0 to ~0, solved
    ``chunk`` samples at a time (so a large ``--n`` neither grows one system nor shares its step control),
    and cached under ``REF_CACHE``: the scored noises of a case are solved once across runs."""
    key = hashlib.sha1(b"".join(t.numpy().tobytes() for t in (gmm.mu, gmm.logw, x_vp))
                       + repr((gmm.c2, round(phi0, 12), rtol, chunk)).encode()).hexdigest()[:20]
    path = REF_CACHE / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    out = torch.cat([_dop853(gmm, x_vp[lo:lo + chunk], phi0, rtol) for lo in range(0, len(x_vp), chunk)])
    REF_CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def _dop853(gmm, x_vp, phi0, rtol):
    shape, phi_end = x_vp.shape, 1e-7

    def f(phi, y):
        x0, noise = gmm.denoise(torch.from_numpy(y).view(shape), math.cos(phi), math.sin(phi))
        return (-math.sin(phi) * x0 + math.cos(phi) * noise).numpy().ravel()

    sol = solve_ivp(f, (phi0, phi_end), x_vp.numpy().ravel(), method="DOP853", rtol=rtol, atol=rtol * 1e-2)
    x = torch.from_numpy(sol.y[:, -1]).view(shape)
    return gmm.denoise(x, math.cos(phi_end), math.sin(phi_end))[0]


class Case:
    """A schedule family: the diffx objective, and how diffusers' schedulers are set up for it."""

    def __init__(self, name, objective, diffusers_kw, flow):
        self.name, self.objective, self.diffusers_kw, self.flow = name, objective, diffusers_kw, flow


CASES = {c.name: c for c in [
    Case("ddpm-linear", DDPM(schedules.ddpm_linear(), uniform_t), {"beta_schedule": "linear"}, False),
    Case("ddpm-cosine", DDPM(schedules.ddpm_cosine(), uniform_t), {"beta_schedule": "squaredcos_cap_v2"}, False),
    Case("flow-linear", Flow(schedules.FlowLinear(), uniform_t), {}, True),
    Case("flow-cosine", Flow(schedules.FlowCosine(), uniform_t), None, True),  # no diffusers / k-diffusion peer
]}
DEFAULT_CASES = ["ddpm-linear", "ddpm-cosine", "flow-linear"]


# ---------------------------------------------------------------------------------------------- diffx
class _ExactNet(torch.nn.Module):
    """Returns the objective's target for the exact posterior, so the run goes through diffx's own
    Denoiser: its NFE count and the objective's inversion are exercised as in ``diffx sample``."""

    def __init__(self, gmm, objective):
        super().__init__()
        self.gmm, self.objective = gmm, objective

    def forward(self, x, t, cond=None):
        a, s = (v[0] for v in self.objective.schedule.alpha_sigma(t[:1].double()))  # tensors: t can be learned
        x0, noise = self.gmm.denoise(x, a, s)
        return self.objective.target(x0, noise, t)


def _unipc3(denoise, schedule, x, ts, generator=None):
    return samplers.unipc(denoise, schedule, x, ts, generator, order=3)


DIFFX_SAMPLERS = {"ddim": samplers.ddim, "heun": samplers.heun, "dpmpp": samplers.dpmpp,
                  "dpmpp_3m": samplers.dpmpp_3m, "unipc": samplers.unipc, "unipc order=3": _unipc3,
                  "ipndm": samplers.ipndm, "dpmpp_sde*": samplers.dpmpp_sde, "ddpm*": samplers.ddpm}
DIFFX_GRIDS = {"uniform": grids.uniform, "karras": grids.karras, "logsnr": grids.logsnr,
               "uniform shift=3": lambda n, s: grids.uniform(n, s, shift=3.0)}


def run_diffx(case, gmm, z, budget):
    out = {}
    for sname, sampler in DIFFX_SAMPLERS.items():
        for gname, grid in DIFFX_GRIDS.items():
            if "shift" in gname and not case.flow:
                continue
            for steps in range(budget, 0, -1):  # the most steps whose NFE fits the budget
                denoise = samplers.make_denoiser(_ExactNet(gmm, case.objective), case.objective)
                x = sampler(denoise, case.objective.schedule, z.clone(), grid(steps, case.objective.schedule),
                            generator=torch.Generator().manual_seed(1))
                if denoise.nfe <= budget:
                    out[f"diffx {sname} [{gname}]"] = (x, denoise.nfe, None)
                    break
    sampler, grid = auto.choose(case.objective.schedule, budget)  # the defaults: sampler=auto grid=auto
    denoise = samplers.make_denoiser(_ExactNet(gmm, case.objective), case.objective)
    x = sampler(denoise, case.objective.schedule, z.clone(), grid(budget, case.objective.schedule))
    out["diffx auto"] = (x, denoise.nfe, None)
    return out


_FITS: dict = {}


def run_learned(case, gmm, z, budget, args):
    """``diffx calibrate``'s fit on this model (``diffx.samplers.calibration.calibrate``): every deterministic
    sampler x grid scored on the calibration and validation noises, the fit started from ``calibration.best``,
    the better of the two on the validation noises kept; one row per ``--calib-methods``. Calibration,
    validation and holdout noises come from other seeds than ``z``, the reference is the model's own UniPC-3
    solve (``learned.reference``), never the DOP853 one, and it is solved once per case for every budget and
    method."""
    den = samplers.make_denoiser(_ExactNet(gmm, case.objective), case.objective)
    key = (case.name, id(gmm))
    if key not in _FITS:
        n_val = args.calib_validation or max(256, args.calib_samples // 8)
        pool = torch.randn(args.calib_samples + 2 * n_val, z.shape[1],
                           generator=torch.Generator().manual_seed(args.seed + 1000), dtype=z.dtype)
        target = calibration.references(lambda idx: den, case.objective.schedule, pool, 200, args.calib_batch)
        _FITS[key] = {m: calibration.calibrate(den, case.objective.schedule, steps=args.learned_nfe, noise=pool,
                                               target=target, samples=args.calib_samples, validation=n_val,
                                               holdout=n_val, method=m.split(","), iters=args.calib_iters,
                                               batch=args.calib_batch, lr=args.calib_lr, t_lr=args.calib_t_lr,
                                               seed=args.seed,
                                               path_weight=args.calib_path_weight,
                                               confidence=args.calib_confidence, freeze=args.calib_freeze)
                      for m in args.calib_methods}
    out = {}
    for method, found in _FITS[key].items():
        result = found[budget]
        den.nfe = 0
        x = result.solver(den, case.objective.schedule, z.clone())
        out[f"diffx learned {method} [auto base]"] = (x, den.nfe, None)
        val = result.scores["validation"]
        tried = "; ".join(f"{m} freeze={f:g}: RMS {sc.rms:.2e}, mean {sc.mean:.2e}, won {c:.0%}"
                          for (m, f), (sc, c) in result.fits.items())
        print(f"- {case.name}, {budget} NFE, {method}: base {result.base}, kept the {result.kept} (the fit, "
              f"{result.method} freeze={result.freeze}, won {result.confidence:.0%} of bootstrap draws); validation "
              f"per-sample mean {val['base'].mean:.2e} (base) / {val['fit'].mean:.2e} (fit), RMS "
              f"{val['base'].rms:.2e} / {val['fit'].rms:.2e}; fits on validation: {tried}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ diffusers
def _diffusers_configs(case):
    import diffusers as D

    if case.flow:
        fm = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
        for shift in (1.0, 3.0):
            tag = f" [shift={shift:g}]"
            yield "FlowMatchEuler" + tag, D.FlowMatchEulerDiscreteScheduler, dict(shift=shift)
            yield "FlowMatchHeun" + tag, D.FlowMatchHeunDiscreteScheduler, dict(shift=shift)
            for o in (2, 3):
                kw = dict(fm, solver_order=o, flow_shift=shift)
                yield f"DPM++{o}M" + tag, D.DPMSolverMultistepScheduler, kw
                yield f"UniPC-bh1 {o}" + tag, D.UniPCMultistepScheduler, dict(kw, solver_type="bh1",
                                                                             final_sigmas_type="sigma_min")
                yield f"UniPC-bh2 {o}" + tag, D.UniPCMultistepScheduler, kw
                yield f"DEIS {o}" + tag, D.DEISMultistepScheduler, kw
            yield "DPM++2M SDE*" + tag, D.DPMSolverMultistepScheduler, dict(fm, flow_shift=shift,
                                                                           algorithm_type="sde-dpmsolver++")
        return
    eps = dict(num_train_timesteps=N_TRAIN, prediction_type="epsilon", **case.diffusers_kw)
    yield "DDIM [trailing]", D.DDIMScheduler, dict(eps, timestep_spacing="trailing", set_alpha_to_one=True)
    spacings = {"trailing": dict(timestep_spacing="trailing"), "linspace": dict(timestep_spacing="linspace"),
                "karras": dict(use_karras_sigmas=True)}
    for tag, sp in spacings.items():
        kw = dict(eps, **sp)
        for name, cls in [("Euler", D.EulerDiscreteScheduler), ("Heun", D.HeunDiscreteScheduler),
                          ("LMS", D.LMSDiscreteScheduler), ("KDPM2", D.KDPM2DiscreteScheduler)]:
            yield f"{name} [{tag}]", cls, kw
        for o in (2, 3):
            yield f"DPM++{o}M [{tag}]", D.DPMSolverMultistepScheduler, dict(kw, solver_order=o)
            # noise-prediction DPM-Solver: diffusers allows only final_sigmas_type="sigma_min" for it
            yield f"DPM-Solver{o}M [{tag}]", D.DPMSolverMultistepScheduler, dict(
                kw, solver_order=o, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
            # bh1 with final_sigmas_type="zero" divides by an infinite step (NaN in diffusers 0.42)
            yield f"UniPC-bh1 {o} [{tag}]", D.UniPCMultistepScheduler, dict(kw, solver_order=o, solver_type="bh1",
                                                                            final_sigmas_type="sigma_min")
            yield f"UniPC-bh2 {o} [{tag}]", D.UniPCMultistepScheduler, dict(kw, solver_order=o)
            yield f"UniPC-bh2 noise {o} [{tag}]", D.UniPCMultistepScheduler, dict(kw, solver_order=o, predict_x0=False)
            yield f"DEIS {o} [{tag}]", D.DEISMultistepScheduler, dict(kw, solver_order=o)
        yield f"DPM++2M SDE* [{tag}]", D.DPMSolverMultistepScheduler, dict(kw, algorithm_type="sde-dpmsolver++")
    for o in (2, 3):
        yield f"DPM++{o}M [lu]", D.DPMSolverMultistepScheduler, dict(eps, solver_order=o, use_lu_lambdas=True)


def _alpha_sigma(sched, i, tau, case):
    """(alpha, sigma) of model call i: the scheduler's own sigma where it keeps one per call."""
    if not hasattr(sched, "sigmas"):  # DDIM: its alpha-bar table at the integer timestep
        abar = float(sched.alphas_cumprod[int(tau)])
        return math.sqrt(abar), math.sqrt(1 - abar)
    if type(sched).__name__.startswith("KDPM2"):  # calls at interpolated sigmas: invert its log-sigma table
        table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).double().sqrt().log().numpy()
        sig = float(np.exp(np.interp(float(tau), np.arange(len(table)), table)))
    else:
        sig = float(sched.sigmas[i])
    if hasattr(sched, "_sigma_to_alpha_sigma_t"):
        a, s = sched._sigma_to_alpha_sigma_t(torch.tensor(sig, dtype=torch.float64))
        return float(a), float(s)
    if case.flow:
        return 1 - sig, sig
    return 1 / math.sqrt(1 + sig**2), sig / math.sqrt(1 + sig**2)


def _run_scheduler(cls, kw, gmm, z, steps, case):
    sched = cls(**kw)
    sched.set_timesteps(steps)
    x = z * getattr(sched, "init_noise_sigma", 1.0)
    start = _alpha_sigma(sched, 0, sched.timesteps[0], case)
    g = torch.Generator().manual_seed(1)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    for i, tau in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, tau) if hasattr(sched, "scale_model_input") else x
        x0, noise = gmm.denoise(x_in, *_alpha_sigma(sched, i, tau, case))
        out = noise - x0 if case.flow else noise
        x = sched.step(out.to(x.dtype), tau, x, return_dict=False, **({"generator": g} if takes_generator else {}))[0]
    return x, len(sched.timesteps), start


def run_diffusers(case, gmm, z, budget, log: dict):
    out = {}
    if case.diffusers_kw is None:
        return out
    for name, cls, kw in _diffusers_configs(case):
        try:
            steps = next(n for n in range(budget, 1, -1) if _calls(cls, kw, n) <= budget)
            x, calls, start = _run_scheduler(cls, kw, gmm, z, steps, case)
        except Exception as e:  # noqa: BLE001 -- a scheduler that fails on a setting is reported, not fatal
            log.setdefault(f"diffusers {name} on {case.name}: {type(e).__name__}", []).append(budget)
            continue
        out[f"diffusers {name}"] = (x, calls, start)
    return out


def _calls(cls, kw, steps):
    sched = cls(**kw)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


# ---------------------------------------------------------------------------------------- k-diffusion
def load_k_sampling():
    """k_diffusion/sampling.py without the package __init__, which imports torchvision, clip, etc.
    Stubs for its unused imports live in sys.modules only while the module loads."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    root = Path(spec.submodule_search_locations[0])
    stubs = {name: types.ModuleType(name) for name in ("k_diffusion", "k_diffusion.utils", "torchdiffeq", "torchsde")}
    stubs["k_diffusion"].__path__ = [str(root)]
    stubs["k_diffusion.utils"].append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    stubs["torchdiffeq"].odeint = None  # only its log-likelihood uses these
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", root / "sampling.py")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                del sys.modules[k]
            else:
                sys.modules[k] = v
    return module


K_SAMPLERS = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde*", "dpmpp_3m_sde*"]


def run_kdiffusion(case, gmm, z, budget, K):
    """k-diffusion works in sigma = sigma/alpha ("VE") space over the model's range; for the flow path
    that ends at t = 0.999 (sigma = 999), where diffusers' flow sigmas for DPM-Solver start too."""
    if case.diffusers_kw is None:
        return {}
    (a_hi, s_hi), (a_lo, s_lo) = case.objective.schedule.table(torch.tensor([1 - case.flow / N_TRAIN, 1 / N_TRAIN]))
    s_max, s_min = s_hi / a_hi, s_lo / a_lo
    k_grids = {"karras": lambda n: K.get_sigmas_karras(n, s_min, s_max, rho=7.0).double(),
               "exponential": lambda n: K.get_sigmas_exponential(n, s_min, s_max).double()}
    out = {}
    for sname in K_SAMPLERS:
        fn = getattr(K, "sample_" + sname.rstrip("*"))
        for gname, grid in k_grids.items():
            for n in range(budget, 1, -1):
                calls = [0]

                def model(x, sigma, **_):  # x in VE space: x_vp = alpha x
                    calls[0] += 1
                    a = 1 / math.sqrt(1 + float(sigma.reshape(-1)[0]) ** 2)
                    return gmm.denoise(x * a, a, math.sqrt(1 - a * a))[0]

                g = torch.Generator().manual_seed(1)
                extra = {"noise_sampler": lambda s, s_next: torch.randn(z.shape, generator=g, dtype=z.dtype)} \
                    if sname.endswith("*") else {}
                x = fn(model, z * math.sqrt(1 + s_max**2), grid(n), disable=True, **extra)
                if calls[0] <= budget:
                    a0 = 1 / math.sqrt(1 + s_max**2)
                    out[f"k-diffusion {sname} [{gname}]"] = (x, calls[0], (a0, s_max * a0))
                    break
    return out


# ------------------------------------------------------------------------------- the defaults' table
def measure_defaults(args):
    """Every deterministic diffx sampler x grid at each NFE, on ``--seeds`` mixtures (new means, weights and
    noises each): the geometric mean over them of the RMS, and of the mean and median per-sample RMS
    endpoint error, and what ``sampler=auto`` picks (``diffx.samplers.auto``) against the best pair.
    ``auto``'s table is read off this output: among the pairs within ``calibration.NEAR`` x the lowest RMS, the
    lowest per-sample mean."""
    for cname in args.cases:
        case, scores = CASES[cname], {}
        for seed in args.seeds:
            gmm = GaussianMixture(args.dim, args.components, args.std, seed)
            z = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            a0, s0 = case.objective.schedule.table(torch.ones(1))[0]
            ref = reference(gmm, z / math.hypot(a0, s0), math.atan2(s0, a0))
            for budget in args.nfe:
                runs = {k.replace("diffx auto", "auto"): v for k, v in run_diffx(case, gmm, z, budget).items()
                        if "*" not in k}
                for name, (x, nfe, _) in runs.items():
                    per_sample = (x.double() - ref).norm(dim=1) / math.sqrt(args.dim)
                    metrics = (per_sample.pow(2).mean().sqrt(), per_sample.mean(), per_sample.median())
                    scores.setdefault(name, {}).setdefault(budget, []).append([math.log(m.item()) for m in metrics])
        gm = {r: {b: tuple(math.exp(sum(v) / len(v)) for v in zip(*scores[r][b])) for b in scores[r]} for r in scores}
        print(f"\n## {cname}: geometric mean over seeds {args.seeds} of the RMS / mean / median per-sample error\n")
        print("| sampler [grid] | " + " | ".join(f"NFE {b}" for b in args.nfe) + " |")
        print("|---|" + "---|" * len(args.nfe))
        key = lambda r: sum(math.log(gm[r][b][1]) for b in args.nfe if b in gm[r])  # noqa: E731
        for r in sorted(gm, key=key):
            print(f"| {r} | " + " | ".join("/".join(f"{v:.2e}" for v in gm[r][b]) if b in gm[r] else "-"
                                          for b in args.nfe) + " |")
        for b in args.nfe:
            pairs = [r for r in gm if r != "auto" and b in gm[r]]
            best = min(pairs, key=lambda r: gm[r][b][0])
            near = [r for r in pairs if gm[r][b][0] <= calibration.NEAR * gm[best][b][0]]
            rule = min(near, key=lambda r: gm[r][b][1])
            mean_best = min(gm[r][b][1] for r in pairs)
            print(f"- NFE {b}: lowest RMS {best} {gm[best][b][0]:.2e}; the rule's pick {rule} "
                  f"{gm[rule][b][0]:.2e} / {gm[rule][b][1]:.2e}; auto = {auto.describe(case.objective.schedule, b)} "
                  f"{gm['auto'][b][0] / gm[best][b][0]:.2f}x the lowest RMS, {gm['auto'][b][1] / mean_best:.2f}x the "
                  "lowest per-sample mean")


# ----------------------------------------------------------------------------- the reference's accuracy
def check_reference(args):
    """``learned.reference`` (what calibration fits to) against DOP853 on the same noises, per sample:
    RMS, max, and how many end more than 0.1 apart (a mode flip) at 100 / 200 / 400 steps."""
    gmm = GaussianMixture(args.dim, args.components, args.std, args.seed)
    z = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    print(f"| case | steps | RMS | max per-sample | flips (> 0.1) |\n|---|---|---|---|---|")
    for cname in args.cases:
        case = CASES[cname]
        a0, s0 = case.objective.schedule.table(torch.ones(1))[0]
        ref = reference(gmm, z / math.hypot(a0, s0), math.atan2(s0, a0))
        den = samplers.make_denoiser(_ExactNet(gmm, case.objective), case.objective)
        for steps in (100, 200, 400):
            err = (learned.reference(den, case.objective.schedule, z.clone(), steps) - ref).pow(2).mean(1).sqrt()
            rms, flips = err.pow(2).mean().sqrt(), (err > 0.1).sum().item()
            print(f"| {cname} | {steps} | {rms:.1e} | {err.max():.1e} | {flips} |", flush=True)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--n", type=int, default=2048, help="samples (start noises)")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--std", type=float, default=0.05, help="component std; the means are uniform in [-0.8, 0.8]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all", action="store_true", help="every sampler x grid, not only each one's best grid")
    p.add_argument("--learned-nfe", nargs="*", type=int, default=[5, 10, 20],
                   help="budgets at which to also fit diffx's learned solver (diffx calibrate); none to skip")
    p.add_argument("--calib-samples", type=int, default=65536, help="calibration noises for the learned solver")
    p.add_argument("--calib-validation", type=int, default=0,
                   help="validation (and holdout) noises of the fit; default calib-samples / 8, at least 256")
    p.add_argument("--calib-iters", type=int, default=1500)
    p.add_argument("--calib-lr", type=float, default=1e-3, help="learned.fit's lr (coefficients)")
    p.add_argument("--calib-t-lr", type=float, default=1e-2, help="learned.fit's t_lr (call times)")
    p.add_argument("--calib-batch", type=int, default=4096)
    p.add_argument("--calib-confidence", type=float, default=calibration.CONFIDENCE,
                   help="the guard's share of bootstrap draws of the validation noises the fit must win (0: any win)")
    p.add_argument("--calib-freeze", nargs="+", type=float, default=[0.0],
                   help="learned.fit's freeze: the share of the first calls whose points and times stay the base's; "
                        "several: one fit each, the best that passes the guard on validation kept")
    p.add_argument("--calib-path-weight", type=float, default=0.0,
                   help="learned.fit's path_weight: the loss on the intermediate states against the reference path")
    p.add_argument("--calib-methods", nargs="+", default=["joint"],
                   help="learned.fit methods to compare (staged, joint, lbfgs), one row each; joint,lbfgs: one "
                        "calibration that fits with each and keeps the best that passes the guard")
    p.add_argument("--no-peers", action="store_true", help="diffx only: skip diffusers and k-diffusion")
    p.add_argument("--defaults", action="store_true",
                   help="only the deterministic diffx samplers x grids over --seeds mixtures: sampler=auto's table")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="mixtures for --defaults")
    p.add_argument("--check-reference", action="store_true",
                   help="only the calibration's reference solve (learned.reference) against DOP853, per sample")
    args = p.parse_args(argv)
    try:
        for m in args.calib_methods:
            calibration.methods(m.split(","))  # a bad name fails before any solve
    except DiffxError as e:
        p.error(str(e))
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' deprecation notes
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    torch.set_flush_denormal(True)  # exp(-large) in the mixture posterior would crawl through subnormals
    if args.defaults:
        return measure_defaults(args)
    if args.check_reference:
        return check_reference(args)
    K = load_k_sampling()
    gmm = GaussianMixture(args.dim, args.components, args.std, args.seed)
    z = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    print(f"# Endpoint error vs NFE: {args.dim}-D mixture of {args.components} Gaussians (std {args.std}), "
          f"{args.n} samples\n\n`python scripts/bench_samplers.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    summary, failures, goals = [], {}, []
    for cname in args.cases:
        case, t0, refs, rows = CASES[cname], time.time(), {}, {}
        for budget in args.nfe:
            runs = run_diffx(case, gmm, z, budget)
            if not args.no_peers:
                runs.update(run_diffusers(case, gmm, z, budget, failures))
            if budget in args.learned_nfe:
                runs.update(run_learned(case, gmm, z, budget, args))
            if K is not None and not args.no_peers:
                runs.update(run_kdiffusion(case, gmm, z, budget, K))
            for name, (x, nfe, start) in runs.items():
                a0, s0 = start or case.objective.schedule.table(torch.ones(1))[0]
                phi0 = math.atan2(s0, a0)
                if round(phi0, 12) not in refs:  # x / sqrt(alpha^2 + sigma^2) is the point on the VP path
                    refs[round(phi0, 12)] = reference(gmm, z / math.hypot(a0, s0), phi0)
                per_sample = (x.double() - refs[round(phi0, 12)]).norm(dim=1)
                rms = per_sample.pow(2).mean().div(args.dim).sqrt().item()
                flips = int((per_sample > 0.1 * math.sqrt(args.dim)).sum())  # per-sample RMS > 0.1: another mode
                rows.setdefault(name, {})[budget] = (rms, nfe, per_sample.median().item(), flips)
        _print_case(cname, rows, args.nfe, time.time() - t0, summary, args.all)
        goals.extend(_goal_rows(cname, rows, args.nfe))
    key = 10 if 10 in args.nfe else args.nfe[0]
    print(f"\n## Summary at {key} NFE (deterministic samplers; ratio < 1: diffx is more accurate)\n")
    print("| case | best diffx | best diffusers / k-diffusion | RMS ratio | without fitting: best diffx, ratio | "
          "median ratio |\n|---|---|---|---|---|---|")
    print("\n".join(summary))
    print("\n## The issue's goals per NFE (RMS; flips: samples ending more than 0.1 RMS off, another mode)\n")
    print("| case | NFE | defaults (auto) | best untuned diffx | fitted | best peer | auto / untuned | fitted / peer |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(goals))
    if failures:
        print("\nSchedulers that raised (skipped), with the NFE budgets:\n")
        print("\n".join(f"- {f} (NFE {', '.join(map(str, b))})" for f, b in sorted(failures.items())))


def _goal_rows(cname, rows, budgets):
    """Per NFE: the defaults, the best untuned diffx pair, the fitted solver and the best deterministic
    diffusers / k-diffusion sampler, with their flip counts; the ratios the issue sets goals for."""
    out = []
    for b in budgets:
        have = {r: v[b] for r, v in rows.items() if b in v and "*" not in r}

        def pick(keep):
            return min((r for r in have if keep(r)), key=lambda r: _nan_last(have[r][0]), default=None)

        untuned = pick(lambda r: r.startswith("diffx") and "learned" not in r and r != "diffx auto")
        fitted, peer = pick(lambda r: "learned" in r), pick(lambda r: not r.startswith("diffx"))
        cell = lambda r: "-" if r is None else f"{have[r][0]:.2e} ({have[r][3]})"  # noqa: E731
        ratio = lambda a, c: "-" if a is None or c is None else f"**{have[a][0] / have[c][0]:.2f}**"  # noqa: E731
        out.append(f"| {cname} | {b} | {cell('diffx auto')} | {untuned.removeprefix('diffx ')} {cell(untuned)} | "
                   f"{cell(fitted)} | {peer or ''} {cell(peer)} | {ratio('diffx auto', untuned)} | {ratio(fitted, peer)} |")
    return out


def _nan_last(err: float) -> float:
    return math.inf if math.isnan(err) else err


def _print_case(cname, rows, budgets, secs, summary, show_all):
    key = 10 if 10 in budgets else budgets[0]
    score = {r: _nan_last(rows[r].get(key, (math.inf,))[0]) for r in rows}
    det = [r for r in rows if "*" not in r and key in rows[r]]
    if any(not r.startswith("diffx") for r in det):  # a summary row needs a peer to compare with
        best = {lib: min((r for r in det if r.startswith("diffx") == lib), key=score.get) for lib in (True, False)}
        med = {lib: min((r for r in det if r.startswith("diffx") == lib), key=lambda r: rows[r][key][2])
               for lib in (True, False)}
        classical = min((r for r in det if r.startswith("diffx") and "learned" not in r), key=score.get)
        rms_ratio = score[best[True]] / score[best[False]]
        med_ratio = rows[med[True]][key][2] / rows[med[False]][key][2]
        summary.append(f"| {cname} | {best[True]} {score[best[True]]:.2e} | {best[False]} {score[best[False]]:.2e} | "
                       f"**{rms_ratio:.2f}** | {classical} {score[classical]:.2e}, {score[classical] / score[best[False]]:.2f} | "
                       f"{med_ratio:.2f} ({med[True]} vs {med[False]}) |")
    if not show_all:  # one row per sampler: its best grid / spacing at the key budget
        first = {}
        for r in sorted(rows, key=score.get):
            first.setdefault(r.split(" [")[0], r)
        rows = {r: rows[r] for r in first.values()}
    print(f"\n## {cname} ({secs:.0f} s): RMS endpoint error\n")
    print("| sampler [grid] | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for r in sorted(rows, key=score.get):
        cells = [f"{rows[r][b][0]:.2e}" + ("" if rows[r][b][1] == b else f" ({rows[r][b][1]})") if b in rows[r]
                 else "-" for b in budgets]
        print(f"| {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
