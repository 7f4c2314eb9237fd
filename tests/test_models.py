"""Model-level contract: forward(x, t, cond) -> like x, for every architecture and condition kind."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
import torch
from conftest import perturb_all
from omegaconf import OmegaConf

from diffx.errors import DiffxError
from diffx.models import layers
from diffx.models.conditioned import TextConditioned
from diffx.models.layers import RMSNorm
from diffx.models.mmdit import MMDiT
from diffx.models.unet import UNet

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
B, C, S, CLASSES, TEXT, POOLED, L = 3, 3, 8, 5, 12, 10, 6

TINY = {
    "unet": lambda **kw: UNet(C, S, channels=8, channel_mult=(1, 2), attn_resolutions=(4,), heads=2,
                              norm_groups=4, **kw),
    "mmdit": lambda **kw: MMDiT(C, S, width=16, depth=2, heads=2, patch_size=2, **kw),
    "mmdit_single": lambda **kw: MMDiT(C, S, width=16, depth=1, heads=2, patch_size=2, single_blocks=2, **kw),
    "mmdit_no_qk_norm": lambda **kw: MMDiT(C, S, width=16, depth=2, heads=2, patch_size=4, qk_norm=False, **kw),
    "unet_pos": lambda **kw: UNet(C, S, channels=8, channel_mult=(1, 2), attn_resolutions=(4,), heads=2,
                                  norm_groups=4, pos_embed=True, qk_norm=True, pooled_text=False, **kw),
    "mmdit_x": lambda **kw: MMDiT(C, S, width=16, depth=2, heads=2, patch_size=2, dual_attention_layers=1, **kw),
    "mmdit_rope": lambda **kw: MMDiT(C, S, width=16, depth=1, heads=2, patch_size=2, single_blocks=1, pos="rope",
                                     dual_attention_layers=1, **kw),
}
CONDS = {
    "none": {},
    "label": {"num_classes": CLASSES},
    "text": {"text_dim": TEXT, "pooled_dim": POOLED},
    "label+text": {"num_classes": CLASSES, "text_dim": TEXT, "pooled_dim": POOLED},
}


def make_cond(kind: str, gen: torch.Generator) -> dict | None:
    """A batch condition with a null label and padded text (row 0 fully padded = the null text)."""
    if kind == "none":
        return None
    cond = {}
    if "label" in kind:
        cond["label"] = torch.tensor([2, -1, 4])
    if "text" in kind:
        cond["tokens"] = torch.randn(B, L, TEXT, generator=gen)
        cond["mask"] = torch.arange(L)[None] < torch.tensor([0, 3, L])[:, None]  # (B, L)
        cond["pooled"] = torch.randn(B, POOLED, generator=gen)
    return cond


@pytest.mark.parametrize("cond_kind", CONDS)
@pytest.mark.parametrize("arch", TINY)
def test_shape_contract_and_zero_init(arch, cond_kind):
    gen = torch.Generator().manual_seed(0)
    model = TINY[arch](**CONDS[cond_kind])
    x = torch.randn(B, C, S, S, generator=gen)
    cond = make_cond(cond_kind, gen)
    for t in (torch.zeros(B), torch.ones(B)):
        out = model(x, t, cond)
        assert out.shape == x.shape
        assert torch.all(out == 0), "the output layer must be zero-initialised"
    perturb_all(model, gen)
    out = model(x, torch.full((B,), 0.5), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", TINY)
def test_gradients_reach_every_parameter(arch):
    gen = torch.Generator().manual_seed(1)
    model = TINY[arch](**CONDS["label+text"])
    x, t = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen)
    cond = make_cond("label+text", gen)
    # Zero-initialised gates block gradients at step 0 (adaLN-Zero); a few SGD steps open them.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        opt.zero_grad()
        (model(x, t, cond) - x).square().mean().backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize("arch", TINY)
def test_padded_tokens_do_not_affect_output(arch):
    gen = torch.Generator().manual_seed(2)
    model = TINY[arch](**CONDS["text"])
    perturb_all(model, gen)
    x, t = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen)
    cond = make_cond("text", gen)
    changed = dict(cond, tokens=torch.where(cond["mask"][..., None], cond["tokens"], 100.0))
    torch.testing.assert_close(model(x, t, changed), model(x, t, cond))
    # The real tokens do matter (the test above is not vacuous).
    real = dict(cond, tokens=cond["tokens"] + cond["mask"][..., None])
    assert not torch.allclose(model(x, t, real), model(x, t, cond))


@pytest.mark.parametrize("arch", TINY)
def test_labels_and_null_label_change_output(arch):
    gen = torch.Generator().manual_seed(3)
    model = TINY[arch](num_classes=CLASSES)
    perturb_all(model, gen)
    x, t = torch.randn(1, C, S, S, generator=gen).expand(3, -1, -1, -1), torch.full((3,), 0.3)
    out = model(x, t, {"label": torch.tensor([0, 1, -1])})
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])


def test_mmdit_streams_have_separate_weights():
    model = TINY["mmdit"](**CONDS["text"])
    for block in model.joint_blocks:
        image = {id(p) for p in block.image.parameters()}
        context = {id(p) for p in block.context.parameters()}
        assert image and context and not image & context
    # Editing the context stream's QKV leaves the image stream's weights untouched.
    block = model.joint_blocks[0]
    before = block.image.to_kv.weight.clone()
    with torch.no_grad():
        block.context.to_kv.weight.add_(1.0)
    assert torch.equal(block.image.to_kv.weight, before)


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (4, 8)])
def test_rms_norm_value_and_gradients_match_the_three_op_formula(shape):
    """RMSNorm's written-out backward (layers._RMSNormFn) against autograd through x * rsqrt(mean x^2 + eps) * w,
    in float64, on a transposed view as the MMDiT's split heads give it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64).transpose(-1, -2)
    x.requires_grad_()
    norm = RMSNorm(shape[-1]).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(shape[-1], generator=gen, dtype=torch.float64))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    ours = norm(x)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, (x, norm.weight), dy)
    want = torch.autograd.grad(ref, (x, norm.weight), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda v, w: layers._RMSNormFn.apply(v, w, 1e-6), (x, norm.weight))


def test_mmdit_exact_gelu_is_the_tanh_gelu_to_round_off_and_old_configs_keep_tanh():
    """model.gelu_approximate=none (the presets' choice) swaps only the MLP's GELU: same weights, outputs within
    the two GELUs' difference; a config without the key (an older checkpoint's) builds SD3's tanh GELU."""
    gen = torch.Generator().manual_seed(1)
    tanh = MMDiT(C, S, width=16, depth=1, heads=2, single_blocks=1, **CONDS["label"])
    perturb_all(tanh, gen)
    exact = MMDiT(C, S, width=16, depth=1, heads=2, single_blocks=1, gelu_approximate="none", **CONDS["label"])
    exact.load_state_dict(tanh.state_dict())
    assert tanh.joint_blocks[0].image.mlp.approximate == "tanh"
    assert tanh.single_stream[0].gelu_approximate == "tanh"
    x, t, cond = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen), {"label": torch.tensor([1, 2, -1])}
    a, b = tanh(x, t, cond), exact(x, t, cond)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * a.abs().max().item())
    for name in ("mmdit", "mmdit_s", "mmdit_b"):
        assert OmegaConf.load(CONF / f"{name}.yaml").gelu_approximate == "none"


def test_mmdit_qk_norm_switch():
    with_norm, without = TINY["mmdit"](), TINY["mmdit_no_qk_norm"]()
    assert any("q_norm.weight" in n for n, _ in with_norm.named_parameters())
    assert not any("q_norm" in n for n, _ in without.named_parameters())


@pytest.mark.parametrize("arch", ["unet", "mmdit_single"])
def test_autocast_bf16(arch):
    gen = torch.Generator().manual_seed(4)
    model = TINY[arch](**CONDS["label+text"])
    perturb_all(model, gen)
    x, t = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, make_cond("label+text", gen))
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: MMDiT(3, 32, width=16, heads=2, patch_size=3), "model.patch_size=3"),
        (lambda: MMDiT(3, 32, width=18, heads=4, patch_size=2), "model.heads=4"),
        (lambda: UNet(3, 10, channels=8, channel_mult=(1, 2, 2), norm_groups=4), "model.channel_mult"),
        (lambda: UNet(3, 16, channels=8, channel_mult=(1, 2), heads=3, norm_groups=4), "model.heads=3"),
        (lambda: UNet(3, 16, channels=8, channel_mult=(1, 2), head_dim=5, norm_groups=4), "model.head_dim=5"),
        (lambda: UNet(3, 16, channels=12, channel_mult=(1, 2), heads=2, norm_groups=8), "model.norm_groups=8"),
        (lambda: UNet(3, 16, channels=6, channel_mult=(1, 2), attn_resolutions=(16,), heads=2, norm_groups=2,
                      pos_embed=True), "model.pos_embed"),
        (lambda: MMDiT(3, 8, width=16, depth=2, heads=2, dual_attention_layers=3), "model.dual_attention_layers=3"),
        (lambda: MMDiT(3, 8, width=24, heads=4, pos="rope"), "model.pos=rope"),
        (lambda: MMDiT(3, 8, width=16, heads=2, pos="alibi"), "model.pos='alibi'"),
        (lambda: MMDiT(3, 8, width=16, heads=2, gelu_approximate="erf"), "model.gelu_approximate='erf'"),
    ],
)
def test_bad_shapes_raise_diffx_error(build, key):
    with pytest.raises(DiffxError, match=key.replace("[", r"\[")):
        build()


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_hydra_instantiate_yaml(path):
    cfg = OmegaConf.load(path)
    if cfg._target_.endswith("MMDiT") and cfg.width > 256:
        cfg.depth = 1  # the preset's shape, not its depth, is what this test checks; keeps it fast
    model = hydra.utils.instantiate(cfg, in_channels=3, image_size=16, num_classes=18)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.rand(2), {"label": torch.tensor([3, -1])})
    assert out.shape == x.shape


@pytest.mark.parametrize("arch", ["unet", "mmdit"])
def test_unconditional_model_ignores_conditions_it_was_not_built_for(arch):
    gen = torch.Generator().manual_seed(5)
    model = TINY[arch]()
    perturb_all(model, gen)
    x, t = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen)
    torch.testing.assert_close(model(x, t, make_cond("label+text", gen)), model(x, t, None))


# --- text encoders of every kind, through the module that holds the encoder's trainable head ---

PROMPTS = ["a small red circle at the top left", "", "a large blue triangle on the right"]


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
    from tiny_hf import encoders, save_all

    return encoders(save_all(tmp_path_factory.mktemp("hf")))


def _fill_padding(key: str, v: torch.Tensor, features: dict) -> torch.Tensor:
    """``v`` with 7 at the positions its mask (``mask``, or ``<encoder>/mask`` for Multi) calls padding."""
    mask = features.get(key[: key.rfind("/") + 1] + "mask")
    if key.endswith("mask") or mask is None or v.shape[:2] != mask.shape:
        return v  # the mask itself, and pooled vectors, which have no sequence
    return v.masked_fill(~mask.view(*mask.shape, *[1] * (v.ndim - 2)), 7)


def _text_model(arch: str, encoder) -> TextConditioned:
    return TextConditioned(TINY[arch](text_dim=encoder.dim, pooled_dim=encoder.pooled_dim), encoder.head())


@pytest.mark.parametrize("kind", ["tiny", "clip", "t5", "multi"])
@pytest.mark.parametrize("arch", ["unet", "mmdit", "mmdit_single"])
def test_text_shape_contract_with_every_encoder_kind(text_encoders, arch, kind):
    encoder, gen = text_encoders[kind], torch.Generator().manual_seed(6)
    model = _text_model(arch, encoder)
    x = torch.randn(B, C, S, S, generator=gen)
    features = encoder.features(PROMPTS)  # the empty prompt: the shortest real sequence, the most padding
    for t in (torch.zeros(B), torch.ones(B)):
        out = model(x, t, features)
        assert out.shape == x.shape and torch.all(out == 0)
    perturb_all(model, gen)
    # Whatever sits at the padded positions of the features, the output is the same.
    padded = {k: _fill_padding(k, v, features) for k, v in features.items()}
    for t in (torch.zeros(B), torch.ones(B)):
        out = model(x, t, features)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(x, t, padded), out)
    # ... and the prompt does matter.
    other = encoder.features(PROMPTS[::-1])
    assert not torch.allclose(model(x, torch.full((B,), 0.5), other)[0], model(x, torch.full((B,), 0.5), features)[0])


def test_text_conditioned_trains_the_encoder_head_jointly(text_encoders):
    encoder, gen = text_encoders["tiny"], torch.Generator().manual_seed(7)
    model = _text_model("mmdit", encoder)
    x, t = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen)
    features = encoder.features(PROMPTS)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):  # adaLN-Zero gates are closed at step 0; a few steps open them
        opt.zero_grad()
        (model(x, t, features) - x).square().mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text.parameters())


# --- activation checkpointing: the same gradients, the same weight names ---

@pytest.mark.parametrize("cond_kind", ["label", "label+text"])
@pytest.mark.parametrize("arch", TINY)
def test_checkpointing_gives_the_same_gradients(arch, cond_kind):
    """``checkpointing=True`` recomputes each block in backward (each block's forward runs twice) and
    changes neither the weight names nor the output or the gradients, beyond float round-off."""
    gen = torch.Generator().manual_seed(8)
    plain, ckpt = TINY[arch](**CONDS[cond_kind]), TINY[arch](checkpointing=True, **CONDS[cond_kind])
    perturb_all(plain, gen)  # open the zero-initialised gates, so every block gets a gradient
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen)
    cond = make_cond(cond_kind, gen)
    blocks = [m for m in ckpt.modules() if type(m).__name__ in ("Stage", "DoubleStreamBlock", "SingleStreamBlock")]
    calls = []
    for m in blocks:
        m.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop before the end

    outs = []
    for model in (plain, ckpt):
        model.train()
        out = model(x, t, cond)
        (out - x).square().mean().backward()
        outs.append(out.detach())
    assert len(calls) == 2 * len(blocks)  # forward, and again in backward: checkpointing did run
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-7, msg=name)
    # In eval mode (sampling, the EMA copy) nothing is recomputed.
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x, t, cond)
    assert len(calls) == len(blocks)


@pytest.mark.parametrize("arch", ["unet", "mmdit"])
def test_checkpointing_with_a_trained_text_encoder_head(text_encoders, arch):
    """Through TextConditioned, with the tiny encoder's head trained jointly: the same gradients,
    the head's included."""
    encoder, gen = text_encoders["tiny"], torch.Generator().manual_seed(9)
    models = [TextConditioned(TINY[arch](text_dim=encoder.dim, pooled_dim=encoder.pooled_dim, checkpointing=on),
                              encoder.head()) for on in (False, True)]
    perturb_all(models[0], gen)
    models[1].load_state_dict(models[0].state_dict())
    x, t = torch.randn(B, C, S, S, generator=gen), torch.rand(B, generator=gen)
    features = encoder.features(PROMPTS)
    for model in models:
        (model.train()(x, t, features) - x).square().mean().backward()
    grads = dict(models[0].named_parameters())
    for name, p in models[1].named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-7, msg=name)
    assert all(p.grad.abs().sum() > 0 for p in models[1].text.parameters())


def test_rope_scores_depend_on_relative_position_only():
    """RoPE's defining property (Su et al. 2021): <R_m q, R_n k> is a function of m - n, per axis."""
    from diffx.models.layers import apply_rope, rope_2d
    gen = torch.Generator().manual_seed(0)
    grid, dh = 5, 8
    cos, sin = rope_2d(dh, grid)
    q, k = torch.randn(2, dh, generator=gen, dtype=torch.float64)
    rotated = lambda v: apply_rope(v.expand(1, 1, grid * grid, dh).float(), (cos, sin))[0, 0].double()  # (N, Dh)
    rq, rk = rotated(q), rotated(k)
    at = lambda r, c: r * grid + c  # row-major token index
    assert torch.allclose(rq[at(0, 0)] @ rk[at(0, 0)], q @ k, atol=1e-5)  # position 0 is no rotation
    for (r1, c1), (r2, c2), (dr, dc) in [((1, 2), (3, 1), (2, 4)), ((0, 4), (2, 3), (1, 0))]:
        shifted = rq[at(r1 + dr, c1 + dc)] @ rk[at(r2 + dr, c2 + dc)] if max(r1, r2) + dr < grid and max(c1, c2) + dc < grid \
            else None
        if shifted is not None:
            assert torch.allclose(rq[at(r1, c1)] @ rk[at(r2, c2)], shifted, atol=1e-5)
    assert not torch.allclose(rq[at(0, 1)] @ rk[at(0, 0)], rq[at(1, 0)] @ rk[at(0, 0)], atol=1e-3)  # rows != columns


def test_mmdit_x_adds_an_image_only_attention_to_the_first_blocks_only():
    model = MMDiT(C, S, width=16, depth=3, heads=2, dual_attention_layers=2)
    assert [b.image.dual for b in model.joint_blocks] == [True, True, False]
    assert all(not b.context.dual for b in model.joint_blocks)
    plain = MMDiT(C, S, width=16, depth=3, heads=2)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    per_block = (16 * 48 + 48) + (16 * 16 + 16) + 2 * 8 + 3 * (16 * 16 + 16)  # qkv2, proj2, qk-norms, 3 adaLN vectors
    assert extra == 2 * per_block


def test_rope_model_has_no_added_position_embedding_and_saves_no_position_tensors():
    model = MMDiT(C, S, width=16, depth=1, heads=2, pos="rope")
    assert model.pos_embed is None and model.rope_cos.shape == (16, 8)
    assert not any("rope" in k or "pos" in k for k in model.state_dict())


@pytest.mark.parametrize("options", [["model=mmdit", "model.pos=rope"], ["model=mmdit", "model.dual_attention_layers=1"],
                                     ["model=unet", "model.pos_embed=true"]], ids=["rope", "mmdit_x", "unet_pos"])
def test_a_training_run_with_each_option_learns(options, tmp_path):
    """40 steps on 8x8 shapes: the loss falls well below its first logged value."""
    import json

    from conftest import compose_config

    from diffx.train import train
    small = (["model.width=32", "model.depth=2", "model.heads=2", "model.patch_size=2"] if "model=mmdit" in options
             else ["model.channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[4]"])
    run = train(compose_config("train", options + small + [
        "data.size=8", "data.n=256", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=40", "train.batch_size=32",
        "train.lr=2e-3", "train.warmup=0", "train.log_every=5", "train.save_every=40", f"run_dir={tmp_path / 'run'}"]))
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert sum(losses[-2:]) / 2 < 0.75 * losses[0], losses


def test_a_text_model_passes_the_guidance_scale_of_a_guided_student_through():
    """A guided-distilled text student (diffx.distill) takes w beside the text head's output."""
    from diffx.text import Tiny
    tiny = Tiny(width=16, depth=1, heads=2, max_length=6)
    model = TextConditioned(MMDiT(C, S, width=16, depth=1, heads=2, text_dim=16, pooled_dim=16, guidance_embed=True),
                            tiny.head())
    gen = torch.Generator().manual_seed(0)
    perturb_all(model, gen)
    x, t = torch.randn(2, C, S, S, generator=gen), torch.full((2,), 0.5)
    cond = tiny.features(["a red circle", "a blue square"])
    out = {w: model(x, t, {**cond, "w": torch.full((2,), w)}) for w in (1.0, 5.0)}
    assert not torch.allclose(out[1.0], out[5.0])
