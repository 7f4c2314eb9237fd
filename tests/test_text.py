"""Text encoders -> {"tokens", "mask", "pooled"}; the per-prompt cache; the null text; the checkpoint."""

from __future__ import annotations

import pytest

from conftest import compose_config, saved_random_model
import torch

from diffx import checkpoint, conditioning
from diffx import shapes as S
from diffx import text
from diffx.build import DataSpec, build, parts_config
from diffx.errors import DiffxError
from tiny_hf import encoders, save_all

PROMPTS = ["a small red circle at the top left", "", "a large blue triangle on the right"]


@pytest.fixture(scope="module")
def hf_paths(tmp_path_factory):
    return save_all(tmp_path_factory.mktemp("hf"))


def check_contract(encoder, prompts=PROMPTS, left_aligned=True):
    features = encoder.features(prompts)
    out = encoder.head()(features)
    b = len(prompts)
    assert out["tokens"].shape[0] == b and out["tokens"].shape[2] == encoder.dim
    assert out["mask"].shape == out["tokens"].shape[:2] and out["mask"].dtype == torch.bool
    assert out["pooled"].shape == (b, encoder.pooled_dim)
    assert torch.isfinite(out["tokens"]).all() and torch.isfinite(out["pooled"]).all()
    # every prompt, the empty one too, has at least one real token, and padding follows the real ones
    lengths = out["mask"].sum(1)
    assert (lengths >= 1).all() and lengths[0] > lengths[1]
    if left_aligned:
        assert torch.equal(out["mask"], torch.arange(out["mask"].shape[1])[None] < lengths[:, None])
    return features, out


def test_tiny_encoder_contract_and_padding():
    features, out = check_contract(text.Tiny(width=16, depth=1, heads=2, max_length=12))
    assert set(features) == {"ids", "mask"}
    assert (out["tokens"][~out["mask"]] == 0).all()


@pytest.mark.parametrize("kind", ["clip", "t5", "multi"])
def test_hf_and_multi_encoder_contract(hf_paths, kind):
    # Multi concatenates each encoder's padded sequence, so its padding sits in several runs.
    check_contract(encoders(hf_paths)[kind], left_aligned=kind != "multi")


def test_hf_features_are_frozen_and_zero_at_padding(hf_paths):
    encoder = encoders(hf_paths)["t5"]
    assert encoder.model is None, "weights load at the first features() call, not when a model is built"
    features = encoder.features(PROMPTS)
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert (features["tokens"][~features["mask"]] == 0).all()
    assert list(encoder.head().parameters()) == []  # nothing of a frozen encoder goes into the model


def test_hf_loads_the_text_tower_of_a_full_clip(hf_paths):
    full, tower = text.HF(str(hf_paths["full_clip"]), max_length=12), encoders(hf_paths)["clip"]
    assert full.dim == tower.dim == 16
    check_contract(full)


def test_hf_pooling_options(hf_paths):
    clip = encoders(hf_paths)["clip"]
    out = clip.features(PROMPTS)
    mean = text.HF(str(hf_paths["clip"]), max_length=12, pool="mean").features(PROMPTS)
    expected = (out["tokens"].sum(1) / out["mask"].sum(1, keepdim=True))
    torch.testing.assert_close(mean["pooled"], expected)
    with pytest.raises(DiffxError, match="pool"):
        text.HF(str(hf_paths["clip"]), pool="max")


def test_hf_bad_path_is_one_line_error(tmp_path):
    with pytest.raises(DiffxError, match="text_encoder.path="):
        text.HF(str(tmp_path / "nothing-here"))


def test_minilm_contract():
    encoder = text.minilm(max_length=16)
    assert encoder.dim == encoder.pooled_dim == 384
    check_contract(encoder)


def test_word_tokenizer_is_stable_and_separates_the_shapes_vocabulary():
    tok = text.WordTokenizer(vocab_size=4096, max_length=12)
    words = {w for a in S.SHAPES + tuple(S.PALETTE) + tuple(S.SIZES) + tuple(S.POSITIONS) for w in a.split()}
    words |= {"a", "an", "at", "on", "in", "the"}
    assert len({tok.word_id(w) for w in words}) == len(words), "two caption words share a hash bucket"
    assert tok.word_id("circle") == 2 + 3568788857 % 4094  # crc32: the same in every process
    out = tok(["A Red, circle!", "", "x " * 20])
    assert out["ids"][0, :4].tolist() == [tok.START, tok.word_id("a"), tok.word_id("red"), tok.word_id("circle")]
    assert out["mask"].sum(1).tolist() == [4, 1, 12]  # start token always; truncated at max_length


def test_text_condition_caches_per_prompt_and_null_is_the_empty_prompt():
    calls = []

    class Counting(text.Tiny):
        def features(self, prompts, device=None):
            calls.append(list(prompts))
            return super().features(prompts, device)

    condition = conditioning.Text(Counting(width=16, depth=1, heads=2))
    first = condition.encode(PROMPTS)
    again = condition({"caption": PROMPTS[::-1] + PROMPTS})
    assert calls == [PROMPTS]  # every distinct prompt encoded once
    for k in first:
        assert torch.equal(again[k][3:], first[k]) and torch.equal(again[k][:3], first[k].flip(0))
    null = condition.null(2)
    assert all(torch.equal(null[k], condition.encode([""] * 2)[k]) for k in null)
    # CFG dropout swaps whole rows for the empty prompt's encoding
    dropped = conditioning.drop(first, 1.0, condition.null(3))
    assert all(torch.equal(dropped[k], null[k][:1].expand_as(dropped[k])) for k in dropped)


def _cfg(overrides):
    return compose_config("train", overrides)


def test_build_supplies_text_width_and_checkpoint_round_trips_the_trained_encoder(tmp_path):
    cfg = _cfg(["model=mmdit", "model.width=32", "model.depth=1", "model.heads=2", "text_encoder=tiny",
                "text_encoder.width=24", "text_encoder.depth=1", "text_encoder.heads=2"])
    spec = DataSpec(channels=3, image_size=8, num_classes=5, class_names=tuple("abcde"))
    path = tmp_path / "model.safetensors"
    parts = saved_random_model(cfg, spec, path, step=3)
    assert isinstance(parts.condition, conditioning.Text)
    assert parts.model.net.context_embed.in_features == 24
    assert "label" not in parts.model.net.cond_embed  # text replaces the class labels
    loaded, _ = checkpoint.load(path)
    assert any(k.startswith("text.") for k in loaded.model.state_dict())  # the jointly trained encoder is saved
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    cond = parts.condition.encode(PROMPTS[:2])
    torch.testing.assert_close(loaded.model(x, t, loaded.condition.encode(PROMPTS[:2])), parts.model(x, t, cond))


def test_checkpoint_of_a_frozen_encoder_stores_no_encoder_weights(tmp_path, hf_paths):
    cfg = _cfg(["model=mmdit", "model.width=32", "model.depth=1", "model.heads=2", "text_encoder=hf",
                f"text_encoder.path={hf_paths['clip']}", "text_encoder.max_length=12"])
    spec = DataSpec(channels=3, image_size=8)
    parts = build(cfg, spec)
    assert not [k for k in parts.model.state_dict() if k.startswith("text.")]
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, parts.model.state_dict(), parts_config(cfg), spec, step=1)
    loaded, _ = checkpoint.load(path)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    torch.testing.assert_close(loaded.model(x, t, loaded.condition.encode(PROMPTS[:2])),
                               parts.model(x, t, parts.condition.encode(PROMPTS[:2])))


def test_loading_an_hf_encoder_first_leaves_meta_device_builds_working(hf_paths):
    # In a fresh process, so that no earlier device-context call has fixed torch's cache.
    import subprocess
    import sys

    code = ("import torch\nfrom diffx import text\n"
            f"text.HF({str(hf_paths['clip'])!r}, max_length=8).features(['a red circle'])\n"
            "with torch.device('meta'):\n    print(torch.linspace(0, 1, 3).device)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "meta", out.stderr[-500:]
