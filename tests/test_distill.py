"""``diffx distill`` (diffx/distill/): a progressive round's target is two teacher DDIM steps, a guided
student's target is the guided teacher, reflow pairs are the teacher's ODE endpoints; a stopped run
resumes exactly; and the command end to end, with ``diffx sample`` on the student's native steps."""

import shutil

import pytest
import torch
from analytic import AnalyticModel, GaussianModel, gaussian, two_point_mixture
from conftest import compose_config, make_objective
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from diffx import checkpoint, generate, grids
from diffx.build import DataSpec, Parts
from diffx.conditioning import Labels, Unconditional
from diffx.distill import guided, progressive, reflow
from diffx.latent import Identity
from diffx.models.mmdit import MMDiT
from diffx.models.unet import UNet
from diffx.samplers import heun, make_denoiser
from diffx.samplers import plan as plans
from diffx.samplers.single import ddim
from diffx.tensors import bcast

CASES = [("flow", "linear", {}), ("flow", "cosine", {}), ("ddpm", "cosine", {"prediction": "v"}),
         ("ddpm", "linear", {"prediction": "eps"})]


class IdealStudent(torch.nn.Module):
    """A student whose output is exactly progressive distillation's target on the student grid."""

    def __init__(self, teacher, objective, teacher_ts, student_ts):
        super().__init__()
        self.teacher, self.objective = teacher, objective
        self.next = {float(student_ts[i]): (teacher_ts[2 * i + 1], student_ts[i + 1]) for i in range(len(student_ts) - 1)}

    def forward(self, xt, t, cond=None):
        t_mid, t_next = (torch.full_like(t, float(v)) for v in self.next[float(t[0])])
        x0 = progressive.two_step_target(self.teacher, self.objective.schedule, xt, t, t_mid, t_next)
        a, s = (bcast(v, xt) for v in self.objective.schedule.alpha_sigma(t))
        return self.objective.target(x0, (xt - a * x0) / s, t)


@pytest.mark.parametrize("family,schedule,kw", CASES, ids=lambda v: str(v))
def test_one_round_halves_the_steps_and_its_target_is_two_teacher_ddim_steps(family, schedule, kw):
    objective = make_objective(family, schedule, **kw)
    teacher = make_denoiser(AnalyticModel(objective, two_point_mixture), objective)
    teacher_ts, student_ts = progressive.grids(grids.uniform(8, objective.schedule), 1)
    assert len(student_ts) - 1 == 4 and torch.equal(student_ts, teacher_ts[::2])
    z = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = ddim(teacher, objective.schedule, z, teacher_ts)
    got = ddim(make_denoiser(IdealStudent(teacher, objective, teacher_ts, student_ts), objective),
               objective.schedule, z, student_ts)
    assert (got - want).abs().max() < 1e-9


@pytest.mark.parametrize("space", ["x0", "v"])
def test_the_student_loss_is_zero_at_the_target_and_weighted_by_truncated_snr(space):
    objective = make_objective("ddpm", "cosine", prediction="eps")
    xt, x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.05, 0.9], dtype=torch.float64)
    a, s = (bcast(v, xt) for v in objective.schedule.alpha_sigma(t))
    exact = objective.target(x0, (xt - a * x0) / s, t)
    assert progressive.student_loss(objective, exact, xt, t, x0, space).abs().max() < 1e-6
    if space == "x0":  # off by d in x0: loss = max(SNR, 1) d^2
        off = objective.target(x0 + 0.1, (xt - a * (x0 + 0.1)) / s, t)
        snr = (a / s).flatten() ** 2
        want = torch.stack([snr[0], snr[1].clamp(min=1)]) * 0.01
        assert torch.allclose(progressive.student_loss(objective, off, xt, t, x0, space).double(), want, rtol=1e-4)


class Conditional(torch.nn.Module):
    """Exact denoiser of Gaussian data whose mean is +0.5 for a label >= 0 and -0.3 for the null label."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective

    def forward(self, xt, t, cond):
        mu = bcast(torch.where(cond["label"] >= 0, 0.5, -0.3).to(xt.dtype), xt)
        a, s = (bcast(v, xt).to(xt.dtype) for v in self.objective.schedule.alpha_sigma(t))
        x0, noise = gaussian(xt, a, s, mu=mu)
        return self.objective.target(x0, noise, t)


@pytest.mark.parametrize("w", [1.0, 2.5, 5.0])
def test_the_guided_students_target_at_w_is_the_guided_teacher(w):
    objective = make_objective("flow", "linear")
    xt = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.7, 1.0], dtype=torch.float64)
    cond, null = {"label": torch.tensor([0, 1, 2, 3])}, {"label": torch.full((4,), -1)}
    target = guided.guided_target(Conditional(objective), objective, cond, null, w, xt, t)
    a, s = (bcast(v, xt) for v in objective.schedule.alpha_sigma(t))
    x0_c, _ = gaussian(xt, a, s, mu=0.5)
    x0_u, _ = gaussian(xt, a, s, mu=-0.3)
    assert torch.allclose(target, x0_u + w * (x0_c - x0_u), atol=1e-10)


def test_the_guided_target_at_a_per_sample_w_is_each_samples_guided_teacher():
    objective = make_objective("flow", "linear")
    xt = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.7, 1.0], dtype=torch.float64)
    cond, null = {"label": torch.tensor([0, 1, 2, 3])}, {"label": torch.full((4,), -1)}
    w = guided.draw_w([1.0, 5.0], 4, torch.Generator().manual_seed(0))
    assert w.shape == (4,) and len(set(w.tolist())) == 4 and ((1 <= w) & (w <= 5)).all()
    target = guided.guided_target(Conditional(objective), objective, cond, null, w, xt, t)
    a, s = (bcast(v, xt) for v in objective.schedule.alpha_sigma(t))
    x0_c, _ = gaussian(xt, a, s, mu=0.5)
    x0_u, _ = gaussian(xt, a, s, mu=-0.3)
    assert torch.allclose(target, x0_u + bcast(w.double(), xt) * (x0_c - x0_u), atol=1e-6)
    for i in range(4):  # row i is the one-scale target at w_i
        one = guided.guided_target(Conditional(objective), objective, cond, null, float(w[i]), xt, t)
        assert torch.allclose(target[i], one[i], atol=1e-6)


def test_a_guidance_scale_of_another_shape_is_refused():
    from diffx.errors import DiffxError

    objective = make_objective("flow", "linear")
    with pytest.raises(DiffxError, match="one scale per sample"):
        make_denoiser(Conditional(objective), objective, {"label": torch.tensor([0, 1])}, cfg_scale=torch.ones(2, 1))


ARCHS = {"unet": (UNet, dict(channels=8, channel_mult=(1, 2), attn_resolutions=())),
         "mmdit": (MMDiT, dict(width=32, depth=1, heads=2, patch_size=2))}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_guided_student_starts_as_its_teacher_and_samples_with_w_as_an_input_in_one_pass(arch):
    torch.manual_seed(0)
    cls, kw = ARCHS[arch]
    kw = dict(in_channels=3, image_size=8, num_classes=4, **kw)
    teacher, student = cls(**kw), cls(**kw, guidance_embed=True)
    missing, _ = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing and all(k.startswith("cond_embed.w.") for k in missing)
    x, t, cond = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.9]), {"label": torch.tensor([1, 2])}
    assert torch.equal(student(x, t, {**cond, "w": torch.tensor([3.0, 7.0])}), teacher(x, t, cond))

    calls = []
    student.register_forward_hook(lambda m, args, out: calls.append((args[0].shape[0], args[2]["w"].tolist())))
    parts = Parts(student, make_objective("flow", "linear"), Identity(), Labels(4), DataSpec(3, 8, 4))
    denoise = generate.denoiser(parts, [1, 2], None, 3.0, "cpu")
    denoise(x, 0.5)
    assert calls == [(2, [3.0, 3.0])] and denoise.nfe == 1  # the batch, not doubled: no unconditional pass


def test_reflow_pairs_are_the_teachers_ode_endpoints_and_resume_by_shard(tmp_path):
    objective = make_objective("flow", "linear")
    model = GaussianModel(objective, mu=0.0, s=0.2)
    parts = Parts(model, objective, Identity(), Unconditional(), DataSpec(1, 2))
    plan = plans.make(heun, grids.uniform, 64, objective.schedule)
    console = Console(quiet=True)
    pairs = reflow.cache_pairs(tmp_path, parts, plan, 10, 4, 1.0, 100, "cpu", 3, console)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard-0000{k}.safetensors" for k in range(3)]
    z = generate.start_noise(parts, generate.noise.generators(list(range(100, 110))), "cpu")
    assert torch.equal(pairs["z"], z)
    # the ODE's own endpoint, to the solver's error (Heun's last step into t = 0 is an Euler step)
    assert (pairs["x0"] - model.ode_solution(z.double()).float()).abs().max() < 5e-3
    drawn = generate.draw(plan, objective.schedule, make_denoiser(model, objective, x0_range=(-1, 1)), z)
    assert torch.allclose(pairs["x0"], drawn, atol=1e-6)  # what `diffx sample` draws from that noise
    (tmp_path / "shard-00001.safetensors").unlink()  # a run stopped while making shard 1
    again = reflow.cache_pairs(tmp_path, parts, plan, 10, 4, 1.0, 100, "cpu", 5, console)
    assert all(torch.equal(again[k], pairs[k]) for k in pairs)


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    """A random-weight text teacher (tiny encoder, flow) of 8x8 shapes with half the combinations held out."""
    from conftest import TINY_TRAIN, saved_random_model

    root = tmp_path_factory.mktemp("text_teacher")
    cfg = compose_config("train", TINY_TRAIN + ["text_encoder=tiny", "text_encoder.width=16", "text_encoder.depth=1",
                                                "text_encoder.heads=2", "data.n=64", "data.holdout=0.5",
                                                f"data.cache_dir={root / 'cache'}"])
    saved_random_model(cfg, DataSpec(3, 8), root / "model.safetensors", step=1)
    return root / "model.safetensors"


def test_reflow_pairs_of_a_text_teacher_are_its_endpoints_for_prompts_of_its_seen_captions(text_teacher, tmp_path):
    from types import SimpleNamespace

    from diffx import holdout
    from diffx.distill.loop import Context

    parts, ckpt = checkpoint.load(text_teacher, "cpu")
    ctx = Context(SimpleNamespace(ckpt=text_teacher), parts, ckpt, tmp_path, SimpleNamespace(device="cpu"), None)
    captions, data = ctx.captions(), ckpt.parts["data"]
    plan = plans.make(heun, grids.uniform, 3, parts.objective.schedule)
    console = Console(quiet=True)
    pairs = reflow.cache_pairs(tmp_path, parts, plan, 10, 4, 3.0, 100, "cpu", 3, console, captions)
    assert len(pairs["caption"]) == 10 and len(set(pairs["caption"])) > 3 and set(pairs["caption"]) <= set(captions)
    held = {holdout.key(a) for a in holdout.held_out(0.5, data["shapes"], data["colors"], data["seed"])}
    drawn = [holdout.pattern(c, data["shapes"], data["colors"]) for c in pairs["caption"]]
    assert held and all(len(a) == 4 and holdout.key(a) not in held for a in drawn)  # held-out prompts stay unseen
    z = generate.start_noise(parts, generate.noise.generators(list(range(100, 110))), "cpu")
    assert torch.equal(pairs["z"], z)
    def sample(prompt, z):  # what `diffx sample` draws from that noise and prompt at cfg 3
        return generate.draw(plan, parts.objective.schedule, generate.denoiser(parts, [prompt], None, 3.0, "cpu"), z)

    for i in (0, 7):  # each pair alone in its batch: its own prompt gives its endpoint, another prompt does not
        assert torch.allclose(pairs["x0"][i: i + 1], sample(pairs["caption"][i], z[i: i + 1]), atol=1e-5)
        other = next(c for c in captions if c != pairs["caption"][i])
        assert not torch.allclose(pairs["x0"][i: i + 1], sample(other, z[i: i + 1]), atol=1e-3)
    (tmp_path / "shard-00001.safetensors").unlink()  # a run stopped while making shard 1
    again = reflow.cache_pairs(tmp_path, parts, plan, 10, 4, 3.0, 100, "cpu", 5, console, captions)
    assert again["caption"] == pairs["caption"] and all(torch.equal(again[k], pairs[k]) for k in ("z", "x0"))


def test_a_text_teacher_reflows_through_the_command(text_teacher, tmp_path):
    from diffx.distill_cmd import distill

    out = distill(_distill_cfg(text_teacher, tmp_path / "r", "method=reflow", "reflow.pairs=8", "reflow.shard=8",
                               "reflow.teacher_steps=2", "batch_size=8"))
    assert checkpoint.read_header(out).sampling["method"] == "reflow-1"
    assert len(reflow.Pairs(reflow._read(tmp_path / "r" / "pairs" / "shard-00000.safetensors"))[3]["caption"]) > 0


def _distill_cfg(ckpt, run_dir, *extra):
    return compose_config("distill", [f"ckpt={ckpt}", f"run_dir={run_dir}", "rounds=1", "teacher_steps=4",
                                      "train.steps=4", "train.batch_size=8", "train.log_every=1", "train.save_every=2",
                                      "train.keep_last=2", *extra])


@pytest.mark.parametrize("method", ["progressive", "guided"])
def test_a_stopped_distill_run_resumes_exactly(tiny_run, tmp_path, method):
    from diffx.distill_cmd import distill

    straight = distill(_distill_cfg(tiny_run / "model.safetensors", tmp_path / "a", f"method={method}"))
    native = checkpoint.read_header(straight).sampling
    assert native["steps"] == 2 and native["ts"] == grids.uniform(4).tolist()[::2]
    # the same run stopped after its step-2 save: the step-4 state and everything after it never written
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    last = tmp_path / "b" / "round1"
    for stale in (last / "state-4", last / "done.json", last / "model.safetensors", tmp_path / "b" / "model.safetensors"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    resumed = distill(_distill_cfg(tiny_run / "model.safetensors", tmp_path / "b", f"method={method}"))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_raising_train_steps_extends_a_finished_round_exactly_unless_a_later_round_learnt_from_it(tiny_run, tmp_path,
                                                                                                   capsys):
    from diffx.distill_cmd import distill
    from diffx.errors import DiffxError

    ckpt = tiny_run / "model.safetensors"
    straight = distill(_distill_cfg(ckpt, tmp_path / "a", "method=progressive"))  # 4 steps
    distill(_distill_cfg(ckpt, tmp_path / "b", "method=progressive", "train.steps=2"))
    capsys.readouterr()
    extended = distill(_distill_cfg(ckpt, tmp_path / "b", "method=progressive"))
    assert "round1: done earlier at step 2; train.steps=4 extends it" in capsys.readouterr().out
    a, b = load_file(str(straight)), load_file(str(extended))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert '"step": 4' in (tmp_path / "b" / "round1" / "done.json").read_text()

    distill(_distill_cfg(ckpt, tmp_path / "c", "method=progressive", "train.steps=2", "rounds=2"))
    with pytest.raises(DiffxError, match="round2 was made from it"):
        distill(_distill_cfg(ckpt, tmp_path / "c", "method=progressive", "train.steps=3", "rounds=2"))


@pytest.mark.slow
def test_distill_then_sample_on_the_students_native_steps_from_the_cli(tiny_run, tmp_path):
    from test_cli import diffx

    ckpt = tiny_run / "model.safetensors"
    common = ["rounds=1", "teacher_steps=4", "train.steps=2", "train.batch_size=8", "train.save_every=2"]
    out = diffx("distill", f"ckpt={ckpt}", "method=progressive", *common, f"run_dir={tmp_path / 'p'}", cwd=tmp_path)
    assert "teacher NFE" in out.stdout and "2-step student" in out.stdout
    diffx("sample", f"ckpt={tmp_path / 'p' / 'model.safetensors'}", "n=2", f"out={tmp_path / 's'}", cwd=tmp_path)
    info = Image.open(tmp_path / "s" / "seed000000.png").text
    assert (info["sampler"], info["steps"], info["nfe"]) == ("ddim", "2", "2")
    diffx("sample", f"ckpt={tmp_path / 'p' / 'model.safetensors'}", "n=2", "steps=3", f"out={tmp_path / 's3'}", cwd=tmp_path)
    # steps= asks for another plan: the default sampler's (sampler=auto picks by schedule and NFE), not the native DDIM
    assert Image.open(tmp_path / "s3" / "seed000000.png").text["sampler"] != "ddim"

    diffx("distill", f"ckpt={ckpt}", "method=guided", *common, f"run_dir={tmp_path / 'g'}", cwd=tmp_path)
    diffx("sample", f"ckpt={tmp_path / 'g' / 'model.safetensors'}", "n=2", "cfg=3", f"out={tmp_path / 'gs'}", cwd=tmp_path)
    assert Image.open(tmp_path / "gs" / "seed000000.png").text["nfe"] == "2"  # guided at cfg 3, one pass a step

    diffx("distill", f"ckpt={ckpt}", "method=reflow", "reflow.pairs=16", "reflow.shard=8", "reflow.teacher_steps=3",
          *common, f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert len(list((tmp_path / "r" / "pairs").iterdir())) == 2
    assert checkpoint.read_header(tmp_path / "r" / "model.safetensors").sampling["steps"] == 1
    bad = diffx("distill", f"ckpt={ckpt}", "method=nope", f"run_dir={tmp_path / 'x'}", cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "method=nope" in bad.stderr


@pytest.mark.parametrize("sampling", [{"steps": 2, "ts": [1.0, 0.5]}, {"steps": 2, "ts": [1.0, 0.6, 0.7]},
                                      {"steps": 0, "ts": [0.0]}, {"steps": 1, "ts": [1.0, 0.1]}, "x"])
def test_a_checkpoints_native_sampling_is_checked(tiny_run, tmp_path, sampling):
    from diffx.errors import DiffxError

    header = checkpoint.read_header(tiny_run / "model.safetensors")
    weights = load_file(str(tiny_run / "model.safetensors"))
    checkpoint.save(tmp_path / "m.safetensors", weights, header.parts, header.spec, 1, {"steps": 1, "ts": [1.0, 0.0]})
    assert checkpoint.read_header(tmp_path / "m.safetensors").sampling == {"steps": 1, "ts": [1.0, 0.0]}
    checkpoint.save(tmp_path / "bad.safetensors", weights, header.parts, header.spec, 1, sampling)
    with pytest.raises(DiffxError, match="metadata sampling"):
        checkpoint.read_header(tmp_path / "bad.safetensors")
