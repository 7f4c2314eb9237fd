"""Prompts as users type them: commas, apostrophes and quotes on the command line need no Hydra
quoting; prompts a model cannot read in full get a one-line warning."""

from __future__ import annotations

from conftest import compose_config

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from diffx.cli import quote_free_text
from diffx.conditioning import Text
from diffx.text import Tiny

TYPED = ["a red circle, small", "the cat's hat", 'say "hi", then go', "cost ${x} [1] {y}", "a=b: c",
         "back\\slash", "ends in a backslash\\", 'quote after backslash\\"']


@pytest.mark.parametrize("typed", TYPED)
def test_a_prompt_typed_after_prompt_equals_reaches_the_config_unchanged(typed):
    override = quote_free_text([f"prompt={typed}"])[0]
    assert OmegaConf.create({"p": OverridesParser.create().parse_override(override).value()}).p == typed
    cfg = compose_config("sample", quote_free_text(["ckpt=x.safetensors", f"prompt={typed}", f"negative_prompt={typed}"]))
    assert cfg.prompt == typed and cfg.negative_prompt == typed


def test_lists_quoted_values_sweeps_and_other_keys_are_left_as_typed():
    args = ["prompt=[a red circle,a blue square]", "prompt='already, quoted'", "steps=3", "prompt="]
    assert quote_free_text(args) == args
    assert quote_free_text(["-m", "prompt=a,b"]) == ["-m", "prompt=a,b"]
    cfg = compose_config("sample", quote_free_text(["ckpt=x", "prompt=[a red circle,a blue square]"]))
    assert list(cfg.prompt) == ["a red circle", "a blue square"]


def test_unseen_words_cut_prompts_and_the_empty_prompt_are_named():
    text = Text(Tiny(max_length=6))
    vocabulary = ("a", "at", "circle", "left", "red", "small", "the", "top")
    notes = text.notes(["a small red circle", "a purple diamond", "a small red circle at the top left", ""], vocabulary)
    assert len(notes) == 3  # the first prompt is read in full
    assert "purple, diamond" in notes[0] and "never appeared" in notes[0]
    assert "'the top left' is cut off" in notes[1]
    assert "empty prompt" in notes[2] and "unconditional" in notes[2]
    assert text.notes(["a purple diamond"], ()) == []  # no vocabulary recorded: nothing to compare with


def test_the_diffx_command_takes_a_prompt_with_a_comma_and_an_apostrophe_unquoted():
    """Through the real entry point, as a shell passes it: `diffx sample prompt="the cat's hat, small"`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "diffx", "sample", "ckpt=x.safetensors", "prompt=the cat's hat, small",
                           "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert OmegaConf.create(proc.stdout).prompt == "the cat's hat, small"
